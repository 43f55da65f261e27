"""The gateway spreads calls over every encoder and decoder replica.

Two encoders, two decoders, one gateway given `--encoder A,B --decoder C,D` (static lists, as a
headless Service's DNS answer is in Kubernetes), a real Redis. Encoder calls are balanced per call
(client-side round robin); decoder calls go to the replica its rendezvous hash picks for each chat's
leading image (gateway/router.py), so distinct images spread over both decoders by hash, not in turn.
Sixteen chats with distinct images (so no feature comes from the cache) must reach both replicas of
each side. Calls are counted per replica from its own Prometheus endpoint
(`ivl_grpc_requests_total`), as an operator would see them.
"""

from __future__ import annotations

import io
import random
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc, vision_pb2
from services.common.server import channel_options
from tests.conftest import load_kit
from tests.integration.procs import ServiceProcess, free_port
from tests.integration.stack import model_args
from tests.redis_server import RedisServer, RedisServerMissing

CHATS = 16
API_KEY = "load-balancing-test-key"
ENCODE = ("internvl.v1.VisionEncoder", "Encode")
GENERATE = ("internvl.v1.LanguageDecoder", "Generate")


@dataclass
class Replica:
    process: ServiceProcess
    metrics_port: int

    def calls(self, service_method: tuple[str, str]) -> int:
        """Finished calls of one method, any status, from the replica's /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        service, method = service_method
        return int(sum(
            sample.value
            for family in text_string_to_metric_families(text) if family.name == "ivl_grpc_requests"
            for sample in family.samples
            if sample.name == "ivl_grpc_requests_total"
            and sample.labels.get("grpc_service") == service and sample.labels.get("grpc_method") == method
        ))


def model_replica(module: str, model_dir: Path) -> Replica:
    # Replicas share one host here: each gets its own metrics port, and one torch thread (four model
    # processes on a small CI machine start faster without contending for every core).
    port = free_port()
    args = [*model_args(model_dir), "--metrics-port", str(port), "--torch-threads", "1"]
    return Replica(ServiceProcess(module, args), port)


@dataclass
class Cluster:
    encoders: list[Replica]
    decoders: list[Replica]
    gateway: ServiceProcess
    redis: RedisServer


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    model_dir = load_kit().root
    try:
        redis = RedisServer(tmp_path_factory.mktemp("lb") / "redis")
    except RedisServerMissing as exc:  # fail, never skip (see tests/integration/conftest.py)
        pytest.fail(str(exc), pytrace=False)
    encoders = [model_replica("services.vision_encoder", model_dir) for _ in range(2)]
    decoders = [model_replica("services.language_decoder", model_dir) for _ in range(2)]
    models = [r.process for r in encoders + decoders]
    gateway: ServiceProcess | None = None
    try:
        redis.start()
        with ThreadPoolExecutor(len(models)) as pool:  # start the four model processes together
            for started in [pool.submit(p.start) for p in models]:
                started.result()
        gateway = ServiceProcess("gateway", [
            "--encoder", ",".join(r.process.address for r in encoders),
            "--decoder", ",".join(r.process.address for r in decoders),
            "--redis-url", redis.url,
            "--metrics-port", str(free_port()),
        ], env={"IVL_GATEWAY_API_KEYS": API_KEY}).start()
        yield Cluster(encoders, decoders, gateway, redis)
    finally:
        if gateway is not None:
            gateway.stop()
        with ThreadPoolExecutor(len(models)) as pool:  # each drains on SIGTERM: stop them together
            list(pool.map(ServiceProcess.stop, models))
        redis.stop()


def distinct_png(seed: int) -> bytes:
    """A 448 x 448 image (one tile) whose bytes no other test image shares."""
    rng = random.Random(seed)
    image = Image.new("RGB", (448, 448), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(64):
        xy = (rng.randrange(448), rng.randrange(448))
        image.putpixel(xy, tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def counts(cluster: Cluster) -> tuple[list[int], list[int]]:
    return [r.calls(ENCODE) for r in cluster.encoders], [r.calls(GENERATE) for r in cluster.decoders]


def test_every_replica_serves_calls(cluster: Cluster):
    images = [distinct_png(seed) for seed in range(CHATS)]
    assert len(set(images)) == CHATS
    assert counts(cluster) == ([0, 0], [0, 0])

    channel = grpc.insecure_channel(cluster.gateway.address, options=channel_options())
    stub = gateway_pb2_grpc.GatewayStub(channel)

    def chat(image: bytes) -> gateway_pb2.ChatResponse:
        request = gateway_pb2.ChatRequest(
            text="<image>\nDescribe the image.",
            images=[vision_pb2.ImageInput(data=image)],
            generation=decoder_pb2.SamplingParams(max_new_tokens=4),
        )
        request.tiling.max_tiles = 1
        return stub.Chat(request, timeout=120, metadata=(("authorization", f"Bearer {API_KEY}"),))

    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(chat, images))
    finally:
        channel.close()
    assert all(r.finish_reason != decoder_pb2.FINISH_REASON_UNSPECIFIED for r in replies)

    # A server counts a call once it has ended, a moment after the gateway has its last message.
    deadline = time.monotonic() + 10
    while (now := counts(cluster)) and sum(now[0]) + sum(now[1]) < 2 * CHATS and time.monotonic() < deadline:
        time.sleep(0.05)
    encodes, generates = now
    detail = f"Encode calls per encoder {encodes}, Generate calls per decoder {generates}"
    # Every image was new, so each chat made exactly one Encode and one Generate call somewhere.
    assert sum(encodes) == CHATS, detail
    assert sum(generates) == CHATS, detail
    # Round robin over both encoders (a channel pinned to one replica gives [16, 0]).
    assert min(encodes) >= CHATS // 4, detail
    # Rendezvous hashing of 16 distinct images over two decoders: all on one happens with odds 2**-15.
    assert min(generates) >= 1, detail
