"""The OpenAI-compatible HTTP API: a thin FastAPI front over the turn core, served by uvicorn in the
gateway's own event loop, next to the gRPC server.

Same rules as the gRPC API: `Authorization: Bearer <key>` with the gateway's API keys (health and
the OpenAPI docs are open, like gRPC health and reflection), the same TLS certificates, `x-request-id`
taken from the client or made up and sent back, the same limits (checked by the core), and a client
that goes away cancels its generation. Errors come in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the status of their kind.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (streamed as server-sent events ending with
`data: [DONE]`, or not), `GET /health` (200 only when encoder, decoder and Redis answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.config import GatewayConfig, HttpConfig
from gateway.core import ChatCore, ChatError, ChatEvent, ErrorKind, RequestContext, internal_error
from gateway.media import MediaFetcher, check_image, decode_data_uri
from gateway.models import ServedModel, ServedModels
from gateway.openai_api import (
    ChatCompletionRequest,
    boxes_json,
    chat_input,
    chunk_json,
    completion_json,
    now,
    usage_json,
)
from services.common.interceptors import assign_request_id
from services.common.logging import request_id_var
from services.common.security import ANONYMOUS_TENANT, ApiKeys

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# The HTTP form of a gRPC deadline: seconds the whole request may take (never more than the default).
DEADLINE_HEADER = "x-request-timeout"
HTTP_STATUS = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.FAILED_PRECONDITION: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.STORE_FULL: 507,  # Insufficient Storage: the session store is full, nothing was lost
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.DEADLINE_EXCEEDED: 504,
    ErrorKind.CANCELLED: 499,  # the client went away: nobody reads it
    ErrorKind.QUOTA_EXCEEDED: 429,
    ErrorKind.INTERNAL: 500,
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
               504: "timeout_error"}
Probe = Callable[[], Awaitable[None]]  # raises when its peer is not reachable


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def chat_error_response(error: ChatError) -> JSONResponse:
    status = HTTP_STATUS[error.kind]
    headers = {}
    if error.retry_after_ms is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after_ms / 1000)))
        headers["retry-after-ms"] = str(error.retry_after_ms)  # the finer hint the openai clients read
    elif status == 429 and error.kind is not ErrorKind.QUOTA_EXCEEDED:  # a quota without a hint: waiting won't do
        headers["retry-after"] = "1"
    return error_response(status, error.message, param=error.param, code=error.kind.value, headers=headers)


class _BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _BodyTooLarge
    return bytes(body)


def create_app(core: ChatCore, config: HttpConfig, *, fetcher: MediaFetcher, api_keys: ApiKeys | None,
               probes: Sequence[tuple[str, Probe]] = (), models: ServedModels | None = None) -> FastAPI:
    """`core` answers for settings and limits; each request's `model` picks its core from `models`
    (default: `core` alone, named `config.served_model_name` or its decoder's checkpoint name)."""
    app = FastAPI(title="InternVL2 gateway (OpenAI-compatible)", version="1")
    models = models or ServedModels([ServedModel(config.served_model_name, core)])

    def model_json(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "internvl-serving"}

    async def model_not_found(name: str) -> JSONResponse:
        return error_response(404, await models.unknown_message(name), param="model", code="model_not_found")

    app.add_middleware(RequestIdAndAuth, api_keys=api_keys)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc.errors())

    @app.exception_handler(ChatError)
    async def chat_error(_request: Request, exc: ChatError) -> JSONResponse:
        return chat_error_response(exc)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, _exc: Exception) -> JSONResponse:
        return chat_error_response(internal_error(f"{request.method} {request.url.path}"))

    @app.get("/health")
    async def health() -> JSONResponse:
        down = []
        for name, probe in probes:
            try:
                await probe()
            except Exception as exc:  # any failure means not ready
                down.append(f"{name}: {type(exc).__name__}")
        if down:
            return error_response(503, "not ready: " + "; ".join(down), code="unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_json(n) for n in await models.names()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        if await models.find(model_id) is None:
            return await model_not_found(model_id)
        return JSONResponse(model_json(model_id))

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ChatCompletionRequest.model_json_schema()}}}})
    async def chat_completions(request: Request):
        try:
            body = await _read_body(request, config.max_body_bytes)
        except _BodyTooLarge:
            return error_response(413, f"the request body is larger than {config.max_body_bytes} bytes",
                                  code="request_too_large")
        try:
            req = ChatCompletionRequest.model_validate_json(body)
        except ValidationError as exc:
            return _validation_response(exc.errors())
        unhonoured = req.unhonoured_field()
        if unhonoured:
            return error_response(400, f"{unhonoured!r} is not supported by this server", param=unhonoured,
                                  code="unsupported_field")
        if not 1 <= req.n <= config.max_choices:
            return error_response(400, f"n must be in [1, {config.max_choices}], got {req.n}", param="n")
        found = await models.find(req.model)
        if found is None:
            return await model_not_found(req.model)
        name, model_core = found
        timeout = model_core.config.default_timeout_s
        asked = request.headers.get(DEADLINE_HEADER)
        if asked is not None:
            try:
                timeout = min(timeout, float(asked))
            except ValueError:
                timeout = -1.0
            if not timeout > 0:
                return error_response(400, f"the {DEADLINE_HEADER} header must be a positive number of seconds",
                                      param=DEADLINE_HEADER)
        ctx = RequestContext(timeout_s=timeout, request_id=request.state.request_id, tenant=request.state.tenant)
        sampling = req.sampling()
        first = await chat_input(req, _loader(model_core, fetcher), sampling)
        inputs = [first if i == 0 or sampling.seed is None
                  else dataclasses.replace(first, sampling=dataclasses.replace(sampling, seed=sampling.seed + i))
                  for i in range(req.n)]
        completion_id = f"chatcmpl-{request.state.request_id}"
        created = now()
        contexts = [ctx] * len(inputs)
        admission = None
        if model_core.quotas is not None and len(inputs) > 1:  # n choices are admitted together, or none
            admission = await model_core.quotas.admit(ctx, [i.sampling.max_new_tokens for i in inputs])
            contexts = [dataclasses.replace(ctx, quota_ticket=t) for t in admission.tickets]
        try:
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                streams = [model_core.chat(inp, c) for inp, c in zip(inputs, contexts, strict=True)]
                firsts = await _first_events(streams)  # errors before any byte is sent get their status
                body_iter = _sse(streams, firsts, completion_id, name, created, include_usage)
                admission = None  # the streams own their tickets now
                return StreamingResponse(body_iter, media_type="text/event-stream",
                                         headers={"cache-control": "no-cache"})
            results = await _unless_disconnected(request, _all_or_none(
                [model_core.complete(i, c) for i, c in zip(inputs, contexts, strict=True)]))
            return JSONResponse(completion_json(completion_id, name, created, [(r.text, r.end) for r in results]))
        finally:
            if admission is not None:
                admission.close()

    return app


OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class RequestIdAndAuth:
    """Plain ASGI middleware (streaming and disconnects pass through untouched): the request id into
    the logs and the response headers, then the API key check."""

    def __init__(self, app, api_keys: ApiKeys | None):
        self.app = app
        self.api_keys = api_keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        given = headers.getlist(REQUEST_ID_HEADER)
        rid = assign_request_id(given[0] if len(given) == 1 else "", unique=True)
        request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, rid)
            await send(message)

        tenant = ANONYMOUS_TENANT  # an open gateway (no keys) has one tenant
        if self.api_keys is not None and scope["path"] not in OPEN_PATHS:
            tenant, problem = _identify(headers.getlist("authorization"), self.api_keys)
            if problem:
                response = error_response(401, problem, code="invalid_api_key")
                return await response(scope, receive, send_with_id)
        scope["state"]["tenant"] = tenant
        return await self.app(scope, receive, send_with_id)


def _identify(values: list[str], keys: ApiKeys) -> tuple[str, str | None]:
    """(the key's tenant, None), or ("", what is wrong with the Authorization header)."""
    if not values:
        return "", "missing API key: send the header 'Authorization: Bearer <key>'"
    if len(values) > 1:
        return "", "send exactly one 'Authorization' header"
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "", "the 'Authorization' header must be 'Bearer <key>'"
    tenant = keys.identify(token.strip())
    if tenant is None:
        return "", "invalid API key"
    return tenant, None


def _validation_response(errors: Sequence[dict]) -> JSONResponse:
    err = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        message = f"{param!r} is not supported by this server"
        return error_response(400, message, param=param, code="unsupported_field")
    message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
    return error_response(400, message, param=param)


def _loader(core: ChatCore, fetcher: MediaFetcher):
    cfg = core.config

    async def load(url: str, kind: str, what: str) -> bytes:
        limit = cfg.max_video_bytes if kind == "video" else cfg.max_image_bytes
        if url.startswith("data:"):
            return decode_data_uri(url, max_bytes=limit, what=what)
        data = await fetcher.fetch(url, max_bytes=limit, what=what)
        if kind == "image":  # judged by decoding, not by the Content-Type (videos: by the encoder)
            await asyncio.to_thread(check_image, data, what)
        return data

    return load


async def _first_events(streams: list[AsyncIterator[ChatEvent]]) -> list[ChatEvent | None]:
    async def first(stream: AsyncIterator[ChatEvent]) -> ChatEvent | None:
        return await anext(stream, None)

    tasks = [asyncio.ensure_future(first(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()
        raise


async def _sse(streams, firsts, completion_id: str, model: str, created: int,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice, the deltas, a finish chunk per choice, usage, [DONE]."""

    def event(choices: list[dict], usage: dict | None = None) -> str:
        chunk = chunk_json(completion_id, model, created, choices, usage, with_usage_field=include_usage)
        return f"data: {json.dumps(chunk)}\n\n"

    usages = {}
    queue: asyncio.Queue = asyncio.Queue(maxsize=64)  # bounded: a slow reader slows the decoders' relay
    done = object()

    async def pump(index: int, stream: AsyncIterator[ChatEvent], first: ChatEvent | None) -> None:
        try:
            if first is not None:
                await queue.put((index, first))
            async for ev in stream:
                await queue.put((index, ev))
        except ChatError as exc:
            await queue.put((index, exc))
        except Exception:
            await queue.put((index, internal_error("chat completion stream")))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts, strict=True))]
    try:
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(len(streams))])
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            if isinstance(item, ChatError):
                err = {"error": {"message": item.message, "type": ERROR_TYPES.get(HTTP_STATUS[item.kind],
                                                                                   "server_error"),
                                 "param": item.param, "code": item.kind.value}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            if item.text:
                yield event([{"index": index, "delta": {"content": item.text}, "logprobs": None,
                              "finish_reason": None}])
            if item.end is not None:
                usages[index] = item.end.usage
                yield event([{"index": index, "delta": {"boxes": boxes_json(item.end.boxes)}, "logprobs": None,
                              "finish_reason": item.end.finish_reason}])
        if include_usage:
            yield event([], usage_json([usages[i] for i in sorted(usages)]))
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()


async def _all_or_none(coros: list[Awaitable]) -> list:
    """Every result; when one fails the others are cancelled (no generation runs for nobody)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


async def _unless_disconnected(request: Request, work: Awaitable):
    """`work`'s result; cancelled (generation stopped) when the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ChatError(ErrorKind.CANCELLED, "the client disconnected")
    return task.result()


# ---------------------------------------------------------------------------------------------- serving


class HttpServer:
    """uvicorn in the running event loop: `start()` binds, `stop()` drains for the grace period.

    Host, TLS and grace period are the gRPC server's (`--http-host` may move the HTTP API elsewhere).
    """

    def __init__(self, app: FastAPI, config: GatewayConfig):
        server = config.server
        self.host = config.http.host or server.host
        self.tls = server.tls
        kwargs = {}
        if self.tls is not None:
            kwargs = {"ssl_certfile": self.tls.cert, "ssl_keyfile": self.tls.key}
            if self.tls.mutual:
                kwargs |= {"ssl_ca_certs": self.tls.ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self._uv_config = uvicorn.Config(app, host=self.host, port=config.http.port, log_config=None,
                                         lifespan="off", access_log=False,
                                         timeout_graceful_shutdown=max(1, int(server.grace_seconds)), **kwargs)
        self._server = uvicorn.Server(self._uv_config)
        self._main: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self) -> int:
        cfg = self._uv_config
        if not cfg.loaded:
            cfg.load()
        self._server.lifespan = cfg.lifespan_class(cfg)
        try:
            await self._server.startup()
        except SystemExit as exc:  # uvicorn exits the process when it cannot bind
            raise RuntimeError(f"could not serve HTTP on {self.host}:{cfg.port} (is the port taken? "
                               "--http-port)") from exc
        if self._server.should_exit or not self._server.servers:
            raise RuntimeError(f"could not serve HTTP on {self.host}:{cfg.port} (is the port taken? --http-port)")
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self._main = asyncio.ensure_future(self._server.main_loop())
        scheme = "https" if self.tls else "http"
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", scheme, self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._main is None:  # never started
            return
        self._server.should_exit = True
        await self._main
        await self._server.shutdown()
