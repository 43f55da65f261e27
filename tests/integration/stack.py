"""The whole system as real processes on loopback: redis-server, encoder, decoder, gateway."""

from __future__ import annotations

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


def start_stack(model_dir: Path, workdir: Path, gateway_args: list[str] = ()) -> Stack:
    redis = RedisServer(workdir / "redis").start()
    encoder = ServiceProcess("services.vision_encoder", model_args(model_dir)).start()
    decoder = ServiceProcess("services.language_decoder", model_args(model_dir)).start()
    gateway = ServiceProcess(
        "gateway",
        ["--encoder", encoder.address, "--decoder", decoder.address, "--redis-url", redis.url, *gateway_args],
    ).start()
    return Stack(redis, encoder, decoder, gateway)
