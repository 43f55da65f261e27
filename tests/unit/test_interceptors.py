"""The standard interceptors on a real in-process gRPC server: request ids, RPC metrics, API keys.

A small byte-level service stands in for ours: every kind of method (unary and streaming either way),
and methods that fail, crash, or run past their deadline.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.interceptors import REQUEST_ID_KEY, ApiKeyInterceptor, split_method
from services.common.logging import configure_logging
from services.common.security import ApiKeys
from services.common.server import GrpcServer, ServerConfig, Service
from tests.compare_digest_spy import spy_on_compare_digest

SERVICE = "test.Echo"
KEY = "k-3f9c2a71d4e8b6"
log = logging.getLogger("test.echo")


def _request_id(context) -> str:
    return dict(context.invocation_metadata()).get(REQUEST_ID_KEY, "")


async def _unary(request: bytes, context) -> bytes:
    log.info("handling unary")
    return _request_id(context).encode()


async def _fail(request: bytes, context) -> bytes:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field x must be positive")


async def _crash(request: bytes, context) -> bytes:
    raise RuntimeError("bug")


async def _slow(request: bytes, context) -> bytes:
    await asyncio.sleep(30)
    return b""


async def _stream(request: bytes, context):
    for i in range(3):
        yield f"{_request_id(context)}:{i}".encode()


async def _stream_in(request_iterator, context) -> bytes:
    n = 0
    async for _ in request_iterator:
        n += 1
    return str(n).encode()


def _add(_servicer, server: grpc.aio.Server) -> None:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Crash": grpc.unary_unary_rpc_method_handler(_crash),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "StreamIn": grpc.stream_unary_rpc_method_handler(_stream_in),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class Echo:
    """An in-process server (optionally with API keys) and a channel to it, in one event loop."""

    def __init__(self, keys: tuple[str, ...] = ()):
        interceptors = [ApiKeyInterceptor(ApiKeys(keys))] if keys else []
        self.server = GrpcServer(ServerConfig(port=0), [Service(SERVICE, _add, None)], interceptors=interceptors)

    async def __aenter__(self) -> Echo:
        port = await self.server.start()
        await self.server.set_serving(True)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(now=True)

    def unary(self, name: str):
        return self.channel.unary_unary(f"/{SERVICE}/{name}")

    def in_flight(self, method: str) -> float | None:
        return self.server.metrics.registry.get_sample_value(
            "ivl_grpc_requests_in_flight", {"grpc_service": SERVICE, "grpc_method": method})

    def count(self, method: str, code: str) -> float:
        value = self.server.metrics.registry.get_sample_value(
            "ivl_grpc_requests_total", {"grpc_service": SERVICE, "grpc_method": method, "grpc_code": code})
        return value or 0.0


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Root logging as the services set it up (JSON lines), into a buffer."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    configure_logging("INFO", "json", stream=buf)
    yield buf
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


async def _eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait (yielding to the server in this loop) until `condition()` holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout_s}s"
        await asyncio.sleep(0.01)


def test_split_method() -> None:
    assert split_method("/internvl.v1.Gateway/Chat") == ("internvl.v1.Gateway", "Chat")


# ---------------------------------------------------------------------------------------- request id


def test_request_id_is_created_returned_and_visible_to_the_servicer(captured_logs) -> None:
    async def main():
        async with Echo() as echo:
            call = echo.unary("Unary")(b"")
            seen = (await call).decode()
            returned = dict(await call.initial_metadata())[REQUEST_ID_KEY]
            return seen, returned

    seen, returned = asyncio.run(main())
    assert seen and seen == returned  # the servicer forwards exactly what the client was told
    handled = [e for e in _lines(captured_logs) if e["message"] == "handling unary"]
    assert handled and handled[0]["request_id"] == seen
    access = [e for e in _lines(captured_logs) if e["logger"] == "services.rpc"]
    assert access and access[0]["request_id"] == seen and "test.Echo/Unary OK" in access[0]["message"]


def test_client_request_id_is_kept_and_forwarded() -> None:
    async def main():
        async with Echo() as echo:
            unary = await echo.unary("Unary")(b"", metadata=((REQUEST_ID_KEY, "req-42"),))
            stream = [m.decode() async for m in echo.channel.unary_stream(f"/{SERVICE}/Stream")(
                b"", metadata=((REQUEST_ID_KEY, "req-43"),))]
            return unary.decode(), stream

    unary, stream = asyncio.run(main())
    assert unary == "req-42"
    assert stream == ["req-43:0", "req-43:1", "req-43:2"]


@pytest.mark.parametrize("bad", ["has space", "x" * 200, "-leading-dash", "a;b\"c"])
def test_unsafe_request_ids_are_replaced(bad: str) -> None:
    async def main():
        async with Echo() as echo:
            return (await echo.unary("Unary")(b"", metadata=((REQUEST_ID_KEY, bad),))).decode()

    seen = asyncio.run(main())
    assert seen and seen != bad and len(seen) == 32


# ---------------------------------------------------------------------------------------- metrics


def test_metrics_count_every_kind_of_call_by_code() -> None:
    async def main():
        async with Echo() as echo:
            await echo.unary("Unary")(b"")
            with pytest.raises(grpc.aio.AioRpcError) as fail:
                await echo.unary("Fail")(b"")
            with pytest.raises(grpc.aio.AioRpcError) as crash:
                await echo.unary("Crash")(b"")
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await echo.unary("Slow")(b"", timeout=0.2)
            await _eventually(lambda: echo.in_flight("Slow") == 0)  # the expired call is recorded
            slow = echo.unary("Slow")(b"")
            await _eventually(lambda: echo.in_flight("Slow") == 1)  # the server is handling it
            slow.cancel()
            assert [m async for m in echo.channel.unary_stream(f"/{SERVICE}/Stream")(b"")]

            async def three():
                for _ in range(3):
                    yield b"x"

            assert await echo.channel.stream_unary(f"/{SERVICE}/StreamIn")(three()) == b"3"
            # The server records a cancelled call once its handler has unwound, after the client moved on.
            await _eventually(lambda: echo.in_flight("Slow") == 0)
            reg = echo.server.metrics.registry
            counts = {
                "ok": echo.count("Unary", "OK"),
                "invalid": echo.count("Fail", "INVALID_ARGUMENT"),
                "unknown": echo.count("Crash", "UNKNOWN"),
                "deadline": echo.count("Slow", "DEADLINE_EXCEEDED"),
                "cancelled": echo.count("Slow", "CANCELLED"),
                "stream": echo.count("Stream", "OK"),
                "stream_in": echo.count("StreamIn", "OK"),
            }
            first = reg.get_sample_value("ivl_grpc_first_response_seconds_count",
                                         {"grpc_service": SERVICE, "grpc_method": "Stream"})
            latency = reg.get_sample_value("ivl_grpc_request_duration_seconds_count",
                                           {"grpc_service": SERVICE, "grpc_method": "Unary", "grpc_code": "OK"})
            in_flight = reg.get_sample_value("ivl_grpc_requests_in_flight",
                                             {"grpc_service": SERVICE, "grpc_method": "Slow"})
            return fail.value.code(), crash.value.code(), late.value.code(), counts, first, latency, in_flight

    fail, crash, late, counts, first, latency, in_flight = asyncio.run(main())
    assert (fail, crash, late) == (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN,
                                   grpc.StatusCode.DEADLINE_EXCEEDED)
    assert counts == dict.fromkeys(counts, 1.0)
    assert first == 1.0 and latency == 1.0 and in_flight == 0.0


def test_metrics_endpoint_serves_the_registry() -> None:
    import urllib.request

    async def main():
        server = GrpcServer(ServerConfig(port=0, metrics_port=_free_port()), [Service(SERVICE, _add, None)])
        await server.start()
        try:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
            await channel.unary_unary(f"/{SERVICE}/Unary")(b"")
            await channel.close()
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        finally:
            await server.stop(now=True)

    text = asyncio.run(main())
    assert 'ivl_grpc_requests_total{grpc_code="OK",grpc_method="Unary",grpc_service="test.Echo"} 1.0' in text
    assert "process_resident_memory_bytes" in text


def test_metrics_port_in_use_leaves_the_server_running(caplog) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main():
            server = GrpcServer(ServerConfig(port=0, metrics_port=port), [Service(SERVICE, _add, None)])
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                    return server.metrics_port, await channel.unary_unary(f"/{SERVICE}/Unary")(b"")
            finally:
                await server.stop(now=True)

        metrics_port, reply = asyncio.run(main())
    assert metrics_port is None and reply is not None
    assert "metrics endpoint NOT started" in caplog.text


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- API keys


def _auth(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "missing API key: send the metadata 'authorization: Bearer <key>'"),
        ((("authorization", KEY),), "the 'authorization' metadata must be 'Bearer <key>'"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "the 'authorization' metadata must be 'Bearer <key>'"),
        (_auth("wrong-key"), "invalid API key"),
        (_auth(KEY + "x"), "invalid API key"),
        (_auth(KEY[:-1]), "invalid API key"),
    ],
)
def test_calls_without_a_valid_key_are_unauthenticated(metadata, message, captured_logs) -> None:
    async def main():
        async with Echo(keys=(KEY, "second-key")) as echo:
            errors = []
            for call in (
                lambda: echo.unary("Unary")(b"", metadata=metadata),
                lambda: _collect(echo.channel.unary_stream(f"/{SERVICE}/Stream")(b"", metadata=metadata)),
                lambda: echo.channel.stream_unary(f"/{SERVICE}/StreamIn")(_one(), metadata=metadata),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call()
                errors.append((err.value.code(), err.value.details()))
            return errors, echo.count("Unary", "UNAUTHENTICATED")

    errors, counted = asyncio.run(main())
    assert errors == [(grpc.StatusCode.UNAUTHENTICATED, message)] * 3
    assert counted == 1.0
    assert KEY not in captured_logs.getvalue()


def test_any_configured_key_is_accepted_and_never_logged(captured_logs) -> None:
    async def main():
        async with Echo(keys=(KEY, "second-key")) as echo:
            a = await echo.unary("Unary")(b"", metadata=_auth(KEY))
            b = await echo.unary("Unary")(b"", metadata=(("authorization", "bearer second-key"),))
            c = await _collect(echo.channel.unary_stream(f"/{SERVICE}/Stream")(b"", metadata=_auth(KEY)))
            return a, b, c

    a, b, c = asyncio.run(main())
    assert a and b and len(c) == 3
    text = captured_logs.getvalue()
    assert KEY not in text and "second-key" not in text


def test_keys_are_checked_in_constant_time_against_every_configured_key(monkeypatch) -> None:
    spy = spy_on_compare_digest(monkeypatch)

    async def main():
        async with Echo(keys=(KEY, "second-key", "third-key")) as echo:
            accepted = await echo.unary("Unary")(b"", metadata=_auth("second-key"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await echo.unary("Unary")(b"", metadata=_auth("wrong-key"))
            return accepted, refused.value.code()

    accepted, refused = asyncio.run(main())
    assert accepted and refused == grpc.StatusCode.UNAUTHENTICATED
    configured = [k.encode() for k in (KEY, "second-key", "third-key")]
    assert spy.pairs == [(b"second-key", k) for k in configured] + [(b"wrong-key", k) for k in configured]


def test_health_and_reflection_need_no_key() -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def main():
        async with Echo(keys=(KEY,)) as echo:
            health = await health_pb2_grpc.HealthStub(echo.channel).Check(health_pb2.HealthCheckRequest())
            stub = reflection_pb2_grpc.ServerReflectionStub(echo.channel)
            replies = [r async for r in stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
            return health.status, replies

    status, replies = asyncio.run(main())
    assert status == health_pb2.HealthCheckResponse.SERVING
    names = {s.name for s in replies[0].list_services_response.service}
    assert SERVICE in names and "grpc.health.v1.Health" in names


async def _collect(call) -> list:
    return [m async for m in call]


async def _one():
    yield b"x"
