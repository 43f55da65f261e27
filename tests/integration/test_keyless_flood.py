"""What callers without a key can make the gateway hold (issue 16 point 5), measured on a real gateway
process from /proc: large keyless gRPC and HTTP requests are refused on their headers (never
received), and thousands of keyless health Watch streams on one connection are capped.

The peers are dead addresses: keyless traffic must never reach them. Redis is real.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from internvl.v1 import gateway_pb2
from services.common.interceptors import OPEN_STREAMS_PER_CONNECTION
from services.common.server import channel_options
from tests.integration.procs import ServiceProcess, free_port
from tests.redis_server import RedisServer

KEY = "k-flood-5e6f7a8b"
MiB = 1 << 20
FLOOD_BYTES = 60 * MiB  # each request: what the attacker sent
FLOOD_REQUESTS = 12
WATCH_STREAMS = 3000
# Generous bounds (allocator noise). Large requests: each keyless call can make the gateway buffer
# at most its receive window (--receive-window, 1 MiB) before it is refused; measured ~4 MiB for the
# whole flood, against 1.44 GB before the refusal came before the read. Watch streams: 3000 calls'
# state at one moment, ~30 MiB once, reused by the next flood (measured +5 MiB).
MAX_REQUEST_FLOOD_GROWTH_BYTES = 16 * MiB
MAX_GROWTH_BYTES = 64 * MiB
MAX_REPEAT_GROWTH_BYTES = 16 * MiB


@dataclass
class Gateway:
    proc: ServiceProcess
    http_port: int

    def memory(self, field: str) -> int:
        """A /proc/<pid>/status field in bytes: VmRSS (resident now) or VmHWM (the peak so far)."""
        assert self.proc.proc is not None
        for line in Path(f"/proc/{self.proc.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc status")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("flood")
    keys = workdir / "keys"
    keys.write_text(f"ops:{KEY}\n")
    dead = free_port()
    http_port = free_port()
    with RedisServer(workdir / "redis") as redis:
        proc = ServiceProcess("gateway", ["--encoder", f"127.0.0.1:{dead}", "--decoder", f"127.0.0.1:{dead}",
                                          "--redis-url", redis.url, "--api-keys-file", str(keys),
                                          "--http-port", str(http_port)])
        with proc:
            _http_up(http_port)  # not /health: it needs the (dead) peers
            yield Gateway(proc, http_port)


def _http_up(port: int) -> None:
    """uvicorn answers (a keyless call to an authenticated path gets its 401)."""
    reply = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
    assert reply.status_code == 401


def _keyless_grpc(address: str, payload: bytes, streaming: bool) -> grpc.StatusCode:
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        method = "/internvl.v1.Gateway/" + ("ChatStream" if streaming else "Chat")
        call = (channel.unary_stream if streaming else channel.unary_unary)(method)  # raw bytes: no copies
        try:
            result = call(payload, timeout=60)
            if streaming:
                list(result)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _keyless_http(port: int, payload: bytes) -> int | str:
    try:
        return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=payload, timeout=60,
                          headers={"content-type": "application/json"}).status_code
    except httpx.TransportError as exc:  # the server answered 401 and closed while the body was still going
        return type(exc).__name__


def test_large_keyless_requests_are_never_received(gateway: Gateway) -> None:
    image = b"\x89PNG" + b"\0" * (FLOOD_BYTES - 4)
    request = gateway_pb2.ChatRequest(text="describe")
    request.images.add(data=image)
    payload = request.SerializeToString()
    del image, request
    # Warm up (first calls allocate once: codecs, thread pools), then take the baseline.
    assert _keyless_grpc(gateway.proc.address, b"", False) == grpc.StatusCode.UNAUTHENTICATED
    _http_up(gateway.http_port)
    before = gateway.memory("VmHWM")

    with ThreadPoolExecutor(max_workers=FLOOD_REQUESTS) as pool:
        grpc_codes = list(pool.map(lambda i: _keyless_grpc(gateway.proc.address, payload, i % 2 == 1),
                                   range(FLOOD_REQUESTS)))
        http_codes = list(pool.map(lambda _: _keyless_http(gateway.http_port, payload), range(FLOOD_REQUESTS)))
    peak = gateway.memory("VmHWM")

    assert grpc_codes == [grpc.StatusCode.UNAUTHENTICATED] * FLOOD_REQUESTS
    assert all(code == 401 or isinstance(code, str) for code in http_codes), http_codes
    assert 401 in http_codes
    growth = peak - before
    assert growth < MAX_REQUEST_FLOOD_GROWTH_BYTES, \
        f"peak RSS grew {growth / MiB:.1f} MiB under {FLOOD_REQUESTS * 2} keyless {FLOOD_BYTES // MiB} MiB requests"
    # The gateway still serves: a keyed call reaches the core (and finds its dead decoder).
    with grpc.insecure_channel(gateway.proc.address, options=channel_options()) as channel, \
            pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/internvl.v1.Gateway/Chat")(
            gateway_pb2.ChatRequest(text="Hi").SerializeToString(), metadata=(("authorization", f"Bearer {KEY}"),),
            timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _watch_flood(address: str) -> list[str]:
    """WATCH_STREAMS keyless Watch calls at once on one connection: each call's outcome."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        calls = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=120) for _ in range(WATCH_STREAMS)]
        outcomes = []
        for call in calls:
            try:
                outcomes.append(health_pb2.HealthCheckResponse.ServingStatus.Name(next(call).status))
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
        for call in calls:
            call.cancel()
    return outcomes


def test_thousands_of_keyless_watch_streams_on_one_connection_are_capped(gateway: Gateway) -> None:
    before = gateway.memory("VmRSS")
    first = _watch_flood(gateway.proc.address)
    after_first = gateway.memory("VmRSS")
    second = _watch_flood(gateway.proc.address)
    after_second = gateway.memory("VmRSS")
    for outcomes in (first, second):
        # The cap's refusal is RESOURCE_EXHAUSTED; under this burst gRPC itself also sheds some calls
        # (CANCELLED) before they reach the handler. None stays open beyond the cap.
        assert outcomes.count("SERVING") == OPEN_STREAMS_PER_CONNECTION
        assert set(outcomes) - {"SERVING"} <= {"RESOURCE_EXHAUSTED", "CANCELLED"}, set(outcomes)
        assert outcomes.count("RESOURCE_EXHAUSTED") > WATCH_STREAMS // 2
    # The first burst costs the gateway some memory once (3000 calls' state at the same moment); a
    # second finds it there to reuse: floods do not add up.
    assert after_first - before < MAX_GROWTH_BYTES, f"RSS grew {(after_first - before) / MiB:.1f} MiB"
    assert after_second - after_first < MAX_REPEAT_GROWTH_BYTES, \
        f"a second flood grew RSS {(after_second - after_first) / MiB:.1f} MiB more"
