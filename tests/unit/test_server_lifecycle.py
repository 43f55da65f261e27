"""serve_until_signal: NOT_SERVING while the model loads, SERVING after, a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import GrpcServer, ServerConfig, serve_until_signal

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def _until(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0) -> None:
    """Poll `condition()` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s}s"
        await asyncio.sleep(0.01)


async def _started(server: GrpcServer) -> None:
    async def bound() -> bool:
        return server.port is not None

    await _until(bound, "listening")


def test_serving_only_once_loaded_then_stops_on_sigterm() -> None:
    async def main():
        server = GrpcServer(ServerConfig(port=0, grace_seconds=5), [])
        loaded = asyncio.Event()

        async def load() -> None:
            await loaded.wait()

        serving = asyncio.ensure_future(serve_until_signal(server, load=load))
        await _started(server)
        during_load = await _status(server.port)
        loaded.set()

        async def serving_now() -> bool:
            return await _status(server.port) == SERVING

        await _until(serving_now, "SERVING after the load")
        after_load = await _status(server.port)
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the loop's handler that serve_until_signal set
        await asyncio.wait_for(serving, 10)
        return during_load, after_load

    assert asyncio.run(main()) == (NOT_SERVING, SERVING)


def test_sigterm_during_a_long_load_stops_without_waiting_for_it() -> None:
    async def main():
        server = GrpcServer(ServerConfig(port=0), [])
        cancelled = asyncio.Event()

        async def load() -> None:
            try:
                await asyncio.Event().wait()  # a load that never finishes by itself
            except asyncio.CancelledError:
                cancelled.set()
                raise

        serving = asyncio.ensure_future(serve_until_signal(server, load=load))
        await _started(server)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, 10)
        return cancelled.is_set()

    assert asyncio.run(main())
