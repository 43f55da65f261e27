"""A whole stack with the knobs the hardening tests and the load benchmark need.

Like `tests/integration/stack.py`, but with extra flags per service (a decoder with a small
context or a tiny queue), a metrics port for each service that has `--metrics-port` (read with
`Stack.metric`), and the gateway in open local mode when it requires an API key by default
(`--insecure-open`). The encoder and the decoder start side by side, which halves start-up time.
Flags are discovered from each module's `--help`, so this works before and after those features.
"""

from __future__ import annotations

import functools
import io
import re
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from PIL import Image

from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc, vision_pb2
from services.common.server import channel_options
from tests.integration.procs import REPO_ROOT, ServiceProcess, free_port
from tests.integration.stack import model_args
from tests.redis_server import RedisServer

ENCODER, DECODER, GATEWAY = "services.vision_encoder", "services.language_decoder", "gateway"


@functools.cache
def help_text(module: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    return out.stdout


def has_flag(module: str, flag: str) -> bool:
    return re.search(rf"(^|\s){re.escape(flag)}[\s=,]", help_text(module)) is not None


def gateway_open_args() -> list[str]:
    """Open local mode where the gateway otherwise requires an API key."""
    return ["--insecure-open"] if has_flag(GATEWAY, "--insecure-open") else []


@dataclass
class Stack:
    redis: RedisServer
    encoder: ServiceProcess
    decoder: ServiceProcess
    gateway: ServiceProcess
    metrics_ports: dict[str, int] = field(default_factory=dict)  # module -> port, where supported

    def channel(self, max_message_bytes: int = 64 << 20) -> grpc.Channel:
        return grpc.insecure_channel(self.gateway.address, options=channel_options(max_message_bytes,
                                                                                  max_message_bytes))

    def gateway_stub(self) -> tuple[grpc.Channel, gateway_pb2_grpc.GatewayStub]:
        channel = self.channel()
        return channel, gateway_pb2_grpc.GatewayStub(channel)

    @property
    def processes(self) -> dict[str, ServiceProcess]:
        return {ENCODER: self.encoder, DECODER: self.decoder, GATEWAY: self.gateway}

    def metric(self, module: str, name: str) -> float | None:
        return read_metric(self.metrics_ports.get(module), name)

    def stop(self) -> None:
        for proc in (self.gateway, self.decoder, self.encoder):
            proc.stop()
        self.redis.stop()


def read_metric(port: int | None, name: str) -> float | None:
    """A sample's value from a service's /metrics (summed over label sets); None without metrics."""
    if port is None:
        return None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values) if values else None


def _with_metrics(module: str, args: Sequence[str], ports: dict[str, int]) -> list[str]:
    if not has_flag(module, "--metrics-port") or "--metrics-port" in args:
        return list(args)
    ports[module] = free_port()
    return [*args, "--metrics-port", str(ports[module])]


def start_gateway(encoder: str, decoder: str, redis_url: str, args: Sequence[str] = (),
                  ports: dict[str, int] | None = None) -> ServiceProcess:
    """A gateway process in front of the given peers (`ports` receives its metrics port, if any)."""
    ports = {} if ports is None else ports
    return ServiceProcess(GATEWAY, _with_metrics(GATEWAY, [
        "--encoder", encoder, "--decoder", decoder, "--redis-url", redis_url, *gateway_open_args(), *args],
        ports)).start()


def start_decoder(model_dir: Path, args: Sequence[str] = (), ports: dict[str, int] | None = None) -> ServiceProcess:
    ports = {} if ports is None else ports
    return ServiceProcess(DECODER, _with_metrics(DECODER, [*model_args(model_dir), *args], ports)).start()


def start_stack(
    model_dir: Path,
    workdir: Path,
    *,
    encoder_args: Sequence[str] = (),
    decoder_args: Sequence[str] = (),
    gateway_args: Sequence[str] = (),
    redis: RedisServer | None = None,
) -> Stack:
    """redis-server (or `redis`, already started), encoder and decoder (in parallel), then the gateway."""
    ports: dict[str, int] = {}
    redis = redis or RedisServer(workdir / "redis").start()
    encoder = ServiceProcess(ENCODER, _with_metrics(ENCODER, [*model_args(model_dir), *encoder_args], ports))
    decoder = ServiceProcess(DECODER, _with_metrics(DECODER, [*model_args(model_dir), *decoder_args], ports))
    try:
        with ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(encoder.start), pool.submit(decoder.start)]:
                started.result()
        gateway = start_gateway(encoder.address, decoder.address, redis.url, gateway_args, ports)
    except BaseException:
        encoder.stop()
        decoder.stop()
        redis.stop()
        raise
    return Stack(redis, encoder, decoder, gateway, ports)


# ------------------------------------------------------------------------------------ requests


def png(width: int, height: int, color: tuple[int, int, int] = (90, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def fresh_image(n: int) -> bytes:
    """A one-tile image no earlier request sent (its colour encodes n), so it is encoded, not cached."""
    return png(448, 448, (n % 251, (n // 251) % 251, 77))


def chat_request(text: str = "What is this?", images: Sequence[bytes] = (), max_new_tokens: int = 4,
                 **generation) -> gateway_pb2.ChatRequest:
    return gateway_pb2.ChatRequest(
        text=text, images=[vision_pb2.ImageInput(data=d) for d in images],
        generation=decoder_pb2.SamplingParams(max_new_tokens=max_new_tokens, **generation),
    )


# Sampling that runs long on the tiny random model: near-uniform over the 1289-token vocabulary, so
# <|im_end|> is rare; this seed happens to run 3000 tokens (~6 s on 2 CPU cores) without stopping.
LONG_GENERATION = {"do_sample": True, "temperature": 1000.0, "seed": 0}
LONG_GENERATION_TOKENS = 3000
# A gateway that accepts such a generation (its default --max-new-tokens is smaller: the drain's limit).
LONG_GENERATION_GATEWAY_ARGS = ("--max-new-tokens", str(LONG_GENERATION_TOKENS))
