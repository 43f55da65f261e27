"""What a caller without a key can cost (issue 16 point 5), on a real in-process gRPC server: its
request message is never received, and its keyless streams (health Watch, reflection) are capped per
connection and in all."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.interceptors import OPEN_STREAMS_PER_CONNECTION, ApiKeyInterceptor
from services.common.security import ApiKeys
from services.common.server import GrpcServer, ServerConfig, Service

SERVICE = "test.Sink"
KEY = "k-5d1e0c7a9b"
LIMIT = 4096  # the server's receive limit in this test


async def _size(request: bytes, _context) -> bytes:
    return str(len(request)).encode()


async def _sizes(request: bytes, _context):
    yield str(len(request)).encode()


def _add(_servicer, server: grpc.aio.Server) -> None:
    handlers = {"Size": grpc.unary_unary_rpc_method_handler(_size),
                "Sizes": grpc.unary_stream_rpc_method_handler(_sizes)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class Sink:
    def __init__(self):
        self.server = GrpcServer(ServerConfig(port=0, max_receive_message_bytes=LIMIT),
                                 [Service(SERVICE, _add, None)], interceptors=[ApiKeyInterceptor(ApiKeys([KEY]))])

    async def __aenter__(self) -> Sink:
        self.port = await self.server.start()
        await self.server.set_serving(True)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop(now=True)

    def channel(self) -> grpc.aio.Channel:
        # Its own connection: channels of one process otherwise share subchannels (one connection).
        return grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=[("grpc.use_local_subchannel_pool", 1)])


@pytest.mark.parametrize("method", ["Size", "Sizes"])
def test_a_keyless_request_is_refused_before_its_message_is_received(method: str) -> None:
    """The message is over the receive limit: had the server received it, the answer would be
    RESOURCE_EXHAUSTED; it is UNAUTHENTICATED, decided on the headers alone. With the key, the
    same message meets the limit and a message within it goes through."""

    async def main():
        async with Sink() as sink, sink.channel() as channel:
            call = (channel.unary_unary if method == "Size" else channel.unary_stream)(f"/{SERVICE}/{method}")

            async def send(payload: bytes, metadata=()):
                result = call(payload, metadata=metadata, timeout=10)
                return await result if method == "Size" else [m async for m in result]

            codes = []
            for payload, metadata in ((b"x" * (4 * LIMIT), ()), (b"x" * (4 * LIMIT), (("authorization", "Bearer no"),)),
                                      (b"x" * (4 * LIMIT), (("authorization", f"Bearer {KEY}"),))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await send(payload, metadata)
                codes.append(err.value.code())
            ok = await send(b"x" * 100, (("authorization", f"Bearer {KEY}"),))
            return codes, ok

    codes, ok = asyncio.run(main())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED,
                     grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert ok in (b"100", [b"100"])


def test_keyless_watch_streams_are_capped_per_connection() -> None:
    async def main():
        async with Sink() as sink, sink.channel() as first, sink.channel() as second:
            def watch(channel):
                return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)

            held = [watch(first) for _ in range(OPEN_STREAMS_PER_CONNECTION)]
            statuses = [(await call.read()).status for call in held]  # each stream is open and answered
            extra = watch(first)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await extra.read()
            other = watch(second)  # another connection has its own allowance
            other_status = (await other.read()).status
            held[0].cancel()
            # The cancelled stream's slot comes back: a new Watch on the first connection is answered.
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                again = watch(first)
                try:
                    again_status = (await again.read()).status
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert asyncio.get_running_loop().time() < deadline, "the cancelled stream's slot never freed"
                    await asyncio.sleep(0.05)
            for call in [*held[1:], other, again]:
                call.cancel()
            return statuses, err.value, other_status, again_status

    statuses, refused, other_status, again_status = asyncio.run(main())
    serving = health_pb2.HealthCheckResponse.SERVING
    assert statuses == [serving] * OPEN_STREAMS_PER_CONNECTION
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per connection" in refused.details()
    assert other_status == serving and again_status == serving
