"""Server interceptors every service mounts, outermost first:

- `RequestIdInterceptor`: the call's `x-request-id` (the client's, or a new one) goes into the log
  context, back to the client in the initial metadata, and into `invocation_metadata()` so the
  servicer forwards it to its peers;
- `MonitoringInterceptor`: RPC counts, latencies and status codes, and one access-log line per call;
- `OpenStreamLimiter`: caps the keyless streams (health Watch, reflection) per connection and in all;
- `ApiKeyInterceptor` (the gateway): `authorization: Bearer <key>` on every method but health and
  reflection, UNAUTHENTICATED otherwise, decided on the headers before the request message is received.

Each wraps the method's behaviour, whatever its kind (unary or streaming either way).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from services.common.logging import request_id_var
from services.common.metrics import RpcMetrics
from services.common.security import ApiKeys

log = logging.getLogger("services.rpc")

REQUEST_ID_KEY = "x-request-id"
# Client-chosen ids reach logs and peers, so only plain tokens are taken, and only short ones.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")
CLIENT_REQUEST_ID_MAX = 64  # characters of a client's id that a public front keeps (then its own suffix)


def assign_request_id(given: str, *, unique: bool) -> str:
    """The id a call is logged and forwarded under.

    An unsafe id (charset, length) is replaced by a new one. A public front (`unique`) never takes a
    client's id as is: two calls with the same id would be one in the logs, so it keeps the id as a
    prefix and adds its own suffix. Internal services (`unique` False) keep the gateway's id, so one
    request's log lines join across services.
    """
    limit = CLIENT_REQUEST_ID_MAX if unique else 128
    if not (len(given) <= limit and _VALID_REQUEST_ID.fullmatch(given)):
        return uuid.uuid4().hex
    return f"{given}.{uuid.uuid4().hex[:12]}" if unique else given
# Probes and tooling need no key; everything else on an authenticated server does.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# A client whose deadline expires cancels the call. The server counts the same deadline from when the
# request headers arrived, a little later, so that cancel can land just before the deadline here
# (measured up to ~2 ms on a loaded loopback). A cancel this close to the deadline is the deadline.
DEADLINE_CANCEL_SLACK_S = 0.1

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
# (behaviour, response_streaming) -> the wrapped behaviour
Wrap = Callable[[Behavior, bool], Behavior]

_KINDS = (  # handler attribute, factory, response streaming
    ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
)


def wrap_handler(handler: grpc.RpcMethodHandler | None, wrap: Wrap) -> grpc.RpcMethodHandler | None:
    """`handler` with its behaviour replaced by `wrap(behaviour, response_streaming)`."""
    if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
        return None
    for attr, factory, streaming in _KINDS:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return factory(wrap(behavior, streaming), handler.request_deserializer, handler.response_serializer)
    raise ValueError(f"method handler without a behaviour: {handler!r}")


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A streaming behaviour's messages, whether it is an async generator or writes with context.write."""
    if inspect.isasyncgen(result):
        async for message in result:
            yield message
    else:
        await result


def split_method(full_method: str) -> tuple[str, str]:
    """`/internvl.v1.Gateway/Chat` -> (`internvl.v1.Gateway`, `Chat`)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


# ---------------------------------------------------------------------------------------- request id


class _ContextWithMetadata:
    """A servicer context whose `invocation_metadata()` carries the request id the interceptor chose."""

    def __init__(self, context: grpc.aio.ServicerContext, metadata: tuple[tuple[str, str], ...]):
        self._context = context
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """`unique`: see `assign_request_id` (on for the public gateway)."""

    def __init__(self, unique: bool = False):
        self.unique = unique

    async def intercept_service(self, continuation, handler_call_details):
        return wrap_handler(await continuation(handler_call_details), self._wrap)

    def _wrap(self, behavior: Behavior, streaming: bool) -> Behavior:
        if streaming:
            async def stream(request, context):
                context = await self._enter(context)
                async for message in _responses(behavior(request, context)):
                    yield message
            return stream

        async def unary(request, context):
            return await behavior(request, await self._enter(context))
        return unary

    async def _enter(self, context: grpc.aio.ServicerContext) -> grpc.aio.ServicerContext:
        metadata = tuple(context.invocation_metadata() or ())
        given = [v for k, v in metadata if k == REQUEST_ID_KEY]
        rid = assign_request_id(given[0] if len(given) == 1 and isinstance(given[0], str) else "",
                                unique=self.unique)
        request_id_var.set(rid)  # this call's task (and what it starts) only
        await context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
        if given == [rid]:
            return context
        rest = tuple((k, v) for k, v in metadata if k != REQUEST_ID_KEY)
        return _ContextWithMetadata(context, (*rest, (REQUEST_ID_KEY, rid)))


# ---------------------------------------------------------------------------------------- monitoring


class MonitoringInterceptor(grpc.aio.ServerInterceptor):
    """Counts, times and logs every call (health checks are counted but not logged)."""

    def __init__(self, metrics: RpcMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        full = handler_call_details.method
        service, method = split_method(full)
        quiet = full.startswith(OPEN_METHOD_PREFIXES)
        return wrap_handler(await continuation(handler_call_details),
                            lambda behavior, streaming: self._wrap(behavior, streaming, service, method, quiet))

    def _wrap(self, behavior: Behavior, streaming: bool, service: str, method: str, quiet: bool) -> Behavior:
        m = self.metrics

        if streaming:
            async def stream(request, context):
                call = _Call(m, service, method, context, quiet)
                try:
                    first = True
                    async for message in _responses(behavior(request, context)):
                        if first:
                            m.first_response.labels(service, method).observe(time.perf_counter() - call.started)
                            first = False
                        yield message
                except BaseException as exc:
                    call.finish(exc)
                    raise
                call.finish(None)
            return stream

        async def unary(request, context):
            call = _Call(m, service, method, context, quiet)
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                call.finish(exc)
                raise
            call.finish(None)
            return response
        return unary


class _Call:
    def __init__(self, metrics: RpcMetrics, service: str, method: str, context, quiet: bool):
        self.metrics, self.service, self.method, self.context, self.quiet = metrics, service, method, context, quiet
        self.started = time.perf_counter()
        metrics.in_flight.labels(service, method).inc()

    def finish(self, exc: BaseException | None) -> None:
        elapsed = time.perf_counter() - self.started
        code = self._code(exc)
        m = self.metrics
        m.in_flight.labels(self.service, self.method).dec()
        m.requests.labels(self.service, self.method, code.name).inc()
        m.duration.labels(self.service, self.method, code.name).observe(elapsed)
        if self.quiet and code == grpc.StatusCode.OK:
            return
        level = logging.WARNING if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) else logging.INFO
        details = self._details()
        log.log(level, "%s/%s %s %.3fs%s", self.service, self.method, code.name, elapsed,
                f": {details}" if details else "")

    def _code(self, exc: BaseException | None) -> grpc.StatusCode:
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            remaining = self.context.time_remaining()
            expired = remaining is not None and remaining <= DEADLINE_CANCEL_SLACK_S
            return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        code = _as_status(self.context.code())
        if code is not None:
            return code
        return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN

    def _details(self) -> str:
        details = self.context.details()
        if isinstance(details, bytes):
            details = details.decode(errors="replace")
        details = (details or "").replace("\n", " ")
        return details if len(details) <= 300 else details[:300] + "..."


def _as_status(code: Any) -> grpc.StatusCode | None:
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    for status in grpc.StatusCode:  # the numeric code, as some gRPC versions return it
        if status.value[0] == code:
            return status
    return None


# ---------------------------------------------------------------------------------------- open streams

# Health Watch and reflection need no key and stay open as long as the client likes: without a cap one
# keyless connection can hold thousands of them (each a coroutine, a queue, HTTP/2 stream state). A
# client-side health checker opens one Watch per connection, reflection tools one stream at a time.
OPEN_STREAMS_PER_CONNECTION = 8
OPEN_STREAMS_TOTAL = 512


class OpenStreamLimiter(grpc.aio.ServerInterceptor):
    """Caps the streaming calls that need no key (health Watch, reflection), per connection and in all:
    one more is RESOURCE_EXHAUSTED at once. Unary health checks are not capped (they end at once)."""

    def __init__(self, per_connection: int = OPEN_STREAMS_PER_CONNECTION, total: int = OPEN_STREAMS_TOTAL):
        self.per_connection = per_connection
        self.total = total
        self._by_peer: dict[str, int] = {}  # open streams per connection (gRPC's peer: address and port)

    @property
    def open_streams(self) -> int:
        return sum(self._by_peer.values())

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming or \
                not handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        return wrap_handler(handler, self._wrap)

    def _wrap(self, behavior: Behavior, _streaming: bool) -> Behavior:
        async def stream(request, context):
            peer = context.peer() or ""
            held = self._by_peer.get(peer, 0)
            if held >= self.per_connection or self.open_streams >= self.total:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"too many open health/reflection streams (at most {self.per_connection} per "
                                    f"connection, {self.total} in all): close some first")
            self._by_peer[peer] = held + 1
            try:
                async for message in _responses(behavior(request, context)):
                    yield message
            finally:
                left = self._by_peer[peer] - 1
                if left:
                    self._by_peer[peer] = left
                else:
                    del self._by_peer[peer]  # bounded: only connections with open streams are kept
        return stream


# ---------------------------------------------------------------------------------------- API keys


class AuthenticatedContext:
    """A servicer context that also says whose key authenticated the call (`tenant`: the key's name)."""

    def __init__(self, context: grpc.aio.ServicerContext, tenant: str):
        self._context = context
        self.tenant = tenant

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def tenant_of(context: Any, default: str) -> str:
    """The tenant `ApiKeyInterceptor` found for this call, or `default` on a server without keys."""
    return context.tenant if isinstance(context, AuthenticatedContext) else default


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <key>` with one of `keys`, except on health and reflection, and
    hands the servicer an `AuthenticatedContext` naming the key's tenant.

    The presented key is never logged or echoed; a failure says only what was wrong with it.
    """

    def __init__(self, keys: ApiKeys):
        self._keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        tenant, problem = self._identify(handler_call_details.invocation_metadata or ())
        if problem is not None:
            return refusal_handler(handler, grpc.StatusCode.UNAUTHENTICATED, problem)
        return wrap_handler(handler, lambda behavior, streaming: _as_tenant(behavior, streaming, tenant))

    def _identify(self, metadata) -> tuple[str, str | None]:
        """(tenant, None) for a valid key, else ("", what is wrong)."""
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            return "", "missing API key: send the metadata 'authorization: Bearer <key>'"
        if len(values) > 1 or not isinstance(values[0], str):
            return "", "send exactly one 'authorization' metadata entry"
        scheme, _, token = values[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "", "the 'authorization' metadata must be 'Bearer <key>'"
        tenant = self._keys.identify(token.strip())
        if tenant is None:
            return "", "invalid API key"
        return tenant, None


def _as_tenant(behavior: Behavior, streaming: bool, tenant: str) -> Behavior:
    if streaming:
        async def stream(request, context):
            async for message in _responses(behavior(request, AuthenticatedContext(context, tenant))):
                yield message
        return stream

    async def unary(request, context):
        return await behavior(request, AuthenticatedContext(context, tenant))
    return unary


def refusal_handler(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode,
                    message: str) -> grpc.RpcMethodHandler | None:
    """A handler that ends the call with `code` without receiving its request.

    gRPC receives (and buffers) a unary request's whole message before its handler runs, up to the
    server's receive limit (64 MiB): refusing in a unary handler would let a keyless caller make the
    server hold that much per call. A request-streaming handler that never reads its iterator ends
    the call on the headers alone; the message is never received.
    """
    if handler is None:
        return None

    if handler.response_streaming:
        async def stream(_requests, context):
            await context.abort(code, message)
            yield  # pragma: no cover - makes this an async generator
        return grpc.stream_stream_rpc_method_handler(stream, None, handler.response_serializer)

    async def unary(_requests, context):
        await context.abort(code, message)
    return grpc.stream_unary_rpc_method_handler(unary, None, handler.response_serializer)
