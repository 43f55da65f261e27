"""The gateway's feature cache and sessions, with every part a real process.

The encoder, the decoder and one or two gateways run as their own processes (`python -m gateway`),
Redis is a real redis-server. Encoder work is counted from outside, through Prometheus: the encoder's
finished `Encode` calls, and each gateway's feature-cache counters (computes on a miss, hits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
import redis as redis_py

from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.server import channel_options
from tests.conftest import load_kit
from tests.integration.observe import Observed, start_observed, wait_for_metrics
from tests.integration.procs import ServiceProcess
from tests.integration.stack import model_args
from tests.redis_server import RedisServer

KIT = load_kit()
ENCODER = "internvl.v1.VisionEncoder"


@dataclass
class Peers:
    encoder: Observed
    decoder: ServiceProcess

    def encodes(self) -> float:
        """Encode calls the encoder has finished successfully, since it started."""
        return self.encoder.metrics().rpc(ENCODER, "Encode", "OK")

    def wait_encodes(self, expected: float) -> float:
        """The Encode count once it reaches `expected` (the call is recorded as it ends), or after 15 s."""
        metrics = wait_for_metrics(self.encoder.metrics_port, lambda m: m.rpc(ENCODER, "Encode", "OK") >= expected)
        return metrics.rpc(ENCODER, "Encode", "OK")


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    encoder = start_observed("services.vision_encoder", model_args(KIT.root), log_level="INFO")
    try:
        # The decoder's GPU-default warm-up and its single-copy CPU weights, forced on here: the answers
        # below must still equal the kit's goldens after throwaway requests went through the engine.
        decoder = ServiceProcess("services.language_decoder",
                                 [*model_args(KIT.root), "--warmup", "on", "--no-cpu-prepacked-weights"]).start()
    except BaseException:
        encoder.process.stop()
        raise
    yield Peers(encoder, decoder)
    decoder.stop()
    encoder.process.stop()


class Gateway:
    """A gateway process (open local mode, its own metrics port) and a client stub to it."""

    def __init__(self, peers: Peers, redis: RedisServer):
        self.observed = start_observed("gateway", [
            "--encoder", peers.encoder.process.address, "--decoder", peers.decoder.address,
            "--redis-url", redis.url, "--insecure-open"], log_level="INFO")
        self.channel = grpc.insecure_channel(self.observed.process.address, options=channel_options())
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.observed.process.stop()

    def cache(self, counter: str) -> float:
        """One of this gateway's feature-cache counters: computes, hits, misses, ..."""
        return self.observed.metrics().get(f"ivl_gateway_feature_cache_{counter}_total")

    def chat(self, text: str, images: list[bytes] = (), session_id: str = "", max_tiles: int = 0,
             max_new_tokens: int = 24) -> str:
        request = gateway_pb2.ChatRequest(session_id=session_id, text=text,
                                          generation=decoder_pb2.SamplingParams(max_new_tokens=max_new_tokens))
        for data in images:
            request.images.add(data=data)
        request.tiling.max_tiles = max_tiles
        return self.stub.Chat(request, timeout=120).text

    def new_session(self) -> str:
        return self.stub.CreateSession(gateway_pb2.CreateSessionRequest(), timeout=30).session_id


@pytest.fixture
def gateways(peers: Peers, redis_server: RedisServer) -> Iterator[Callable[[], Gateway]]:
    """Starts gateway replicas on this test's own redis-server; all are stopped afterwards."""
    started: list[Gateway] = []

    def start() -> Gateway:
        started.append(Gateway(peers, redis_server))
        return started[-1]

    yield start
    for gw in started:
        gw.stop()


def image_bytes(image_id: str) -> bytes:
    return KIT.path(KIT.images[image_id]["file"]).read_bytes()


def test_text_only_requests_skip_the_encoder(peers, gateways):
    gw = gateways()
    before = peers.encodes()
    gw.chat("Hello, who are you?")
    assert gw.cache("computes") == 0 and gw.cache("misses") == 0
    assert peers.encodes() == before


def new_tokens(case: dict) -> int:
    return case["inputs"]["generation_config"]["max_new_tokens"]


def test_repeated_image_is_encoded_once(peers, gateways):
    case = KIT.case("image_round1")
    (image_id,) = case["inputs"]["images"]
    if KIT.image(image_id)["num_tiles"] < 2:
        KIT.lacks(f"multi-tile image in case image_round1 ({image_id!r} has one tile)")
    gw = gateways()
    before = peers.encodes()
    img = image_bytes(image_id)
    first = gw.chat(case["inputs"]["question"], [img], max_new_tokens=new_tokens(case))
    second = gw.chat(case["inputs"]["question"], [img], max_new_tokens=new_tokens(case))
    assert first == second == case["expected"]["responses"][0]
    assert peers.wait_encodes(before + 1) == before + 1
    assert (gw.cache("computes"), gw.cache("hits")) == (1, 1)
    # Other tiling settings (one tile instead of several) give other embeddings: a separate cache entry.
    gw.chat("Describe.", [img], max_tiles=1)
    assert peers.wait_encodes(before + 2) == before + 2
    assert gw.cache("computes") == 2


def test_concurrent_requests_for_a_new_image_share_one_encode(peers, gateways):
    gw = gateways()
    before = peers.encodes()
    img = image_bytes(KIT.manifest["images"][0]["id"])
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: gw.chat("What is this?", [img], max_new_tokens=4), range(8)))
    assert len(set(answers)) == 1
    assert peers.wait_encodes(before + 1) == before + 1
    assert gw.cache("computes") == 1


def test_cache_is_shared_by_gateway_replicas(peers, gateways):
    one, two = gateways(), gateways()
    before = peers.encodes()
    img = image_bytes(KIT.manifest["images"][1]["id"])
    one.chat("Describe.", [img], max_new_tokens=4)
    two.chat("Describe.", [img], max_new_tokens=4)
    assert (one.cache("computes"), two.cache("computes")) == (1, 0)
    assert two.cache("hits") == 1
    assert peers.wait_encodes(before + 1) == before + 1


def test_follow_up_turn_reuses_features_and_survives_eviction(peers, gateways, redis_server):
    round1, round2 = KIT.case("image_round1"), KIT.case("image_round2")
    gw = gateways()
    before = peers.encodes()
    img = image_bytes(round1["inputs"]["images"][0])
    session_id = gw.new_session()
    gw.chat(round1["inputs"]["question"], [img], session_id, max_new_tokens=new_tokens(round1))
    assert peers.wait_encodes(before + 1) == before + 1
    # The follow-up sends only text: history and image come from the session; the decoder still holds
    # the image's KV, so its features are not even read from Redis (lazy images, decoder.proto).
    assert gw.chat(round2["inputs"]["question"], session_id=session_id, max_new_tokens=new_tokens(round2)) == \
        round2["expected"]["responses"][0]
    assert gw.cache("computes") == 1 and gw.cache("hits") == 0
    # Evict every cached feature and the decoder's KV (a restarted decoder): the next turn re-encodes
    # from the image bytes the session kept.
    with redis_py.Redis.from_url(redis_server.url) as client:
        keys = list(client.scan_iter(match="ivl:feat:*"))
        assert keys
        client.delete(*keys)
    peers.decoder.stop()
    peers.decoder.start(port=peers.decoder.port)
    again = gw.stub.GetSession(gateway_pb2.GetSessionRequest(session_id=session_id), timeout=30)
    assert len(again.turns) == 2
    gw.chat("And the colours?", session_id=session_id)
    assert peers.wait_encodes(before + 2) == before + 2
    assert gw.cache("computes") == 2


def test_sessions_are_served_by_any_replica(gateways):
    round1, round2 = KIT.case("text_single_round"), KIT.case("text_second_round")
    one, two = gateways(), gateways()
    session_id = one.new_session()
    one.chat(round1["inputs"]["question"], session_id=session_id, max_new_tokens=new_tokens(round1))
    assert two.chat(round2["inputs"]["question"], session_id=session_id, max_new_tokens=new_tokens(round2)) == \
        round2["expected"]["responses"][0]
