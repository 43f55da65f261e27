"""The whole system as real processes on loopback: redis-server, encoder, decoder, gateway."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from internvl.v1 import gateway_pb2_grpc
from services.common.server import channel_options
from tests.integration.procs import ServiceProcess
from tests.redis_server import RedisServer


@dataclass
class Stack:
    redis: RedisServer
    encoder: ServiceProcess
    decoder: ServiceProcess
    gateway: ServiceProcess

    def gateway_stub(self) -> tuple[grpc.Channel, gateway_pb2_grpc.GatewayStub]:
        channel = grpc.insecure_channel(self.gateway.address, options=channel_options())
        return channel, gateway_pb2_grpc.GatewayStub(channel)

    def stop(self) -> None:
        for proc in (self.gateway, self.decoder, self.encoder):
            proc.stop()
        self.redis.stop()


def model_args(model_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--device", "cpu", "--dtype", "fp32"]


def start_stack(model_dir: Path, workdir: Path, gateway_args: Sequence[str] = ()) -> Stack:
    """Start everything; the gateway is open (no API key) unless `gateway_args` configure keys."""
    gateway_args = list(gateway_args)
    if not any(a.startswith("--api-keys") for a in gateway_args):
        gateway_args.append("--insecure-open")
    started: list = []
    try:
        redis = RedisServer(workdir / "redis").start()
        started.append(redis)
        encoder = ServiceProcess("services.vision_encoder", model_args(model_dir)).start()
        started.append(encoder)
        decoder = ServiceProcess("services.language_decoder", model_args(model_dir)).start()
        started.append(decoder)
        gateway = ServiceProcess(
            "gateway",
            ["--encoder", encoder.address, "--decoder", decoder.address, "--redis-url", redis.url, *gateway_args],
        ).start()
    except BaseException:
        for proc in reversed(started):  # nothing left running when a later process fails to start
            proc.stop()
        raise
    return Stack(redis, encoder, decoder, gateway)
