"""The public gRPC API: a thin front over the turn core (gateway/core.py).

Requests become `ChatInput`s, the core's events become response messages, and a `ChatError`
aborts the call with the gRPC code of its kind (a peer's retry hint goes back as `retry-after-ms`
trailing metadata).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc

from gateway.core import (
    RETRY_AFTER_KEY,
    ChatCore,
    ChatError,
    ChatEvent,
    ChatInput,
    Completion,
    ErrorKind,
    RequestContext,
    Sampling,
    TilingRequest,
    TurnEnd,
    UserTurn,
    VideoInput,
    internal_error,
)
from gateway.models import ServedModel, ServedModels
from gateway.sessions import Session
from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.interceptors import tenant_of
from services.common.security import ANONYMOUS_TENANT

GRPC_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.STORE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.QUOTA_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
_FINISH = {"stop": decoder_pb2.FINISH_REASON_STOP, "length": decoder_pb2.FINISH_REASON_LENGTH}


async def abort(context, error: ChatError) -> None:
    trailing = () if error.retry_after_ms is None else ((RETRY_AFTER_KEY, str(error.retry_after_ms)),)
    await context.abort(GRPC_CODES[error.kind], error.message, trailing_metadata=trailing)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, core: ChatCore, models: ServedModels | None = None):
        self.core = core  # sessions and settings; turns go to their model's core
        self.models = models or ServedModels([ServedModel(core.config.http.served_model_name, core)])

    async def ChatStream(self, request, context) -> AsyncIterator[gateway_pb2.ChatStreamResponse]:
        error = None
        try:
            core = await self.models.core_for(request.model)
            async for event in core.chat(chat_input(request), self._context(context)):
                yield stream_response(event, request.session_id)
        except ChatError as err:
            error = err
        except Exception:
            error = internal_error("ChatStream")
        if error is not None:  # outside the except blocks: context.abort raises
            await abort(context, error)

    async def Chat(self, request, context) -> gateway_pb2.ChatResponse:
        try:
            core = await self.models.core_for(request.model)
            return unary_response(await core.complete(chat_input(request), self._context(context)),
                                  request.session_id)
        except ChatError as err:
            error = err
        except Exception:
            error = internal_error("Chat")
        await abort(context, error)

    async def BatchChat(self, request, context) -> gateway_pb2.BatchChatResponse:
        n = len(request.requests)
        limit = self.core.config.max_batch_size
        if not 1 <= n <= limit:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a batch holds 1..{limit} requests, got {n}")
        if any(r.session_id for r in request.requests):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch requests cannot use sessions")
        ctx = self._context(context)
        contexts = [ctx] * n
        admission = None
        tasks = []
        try:
            cores = [await self.models.core_for(r.model) for r in request.requests]
            if self.core.quotas is not None:  # the whole batch is admitted, or none of it
                admission = await self.core.quotas.admit(ctx, [r.generation.max_new_tokens for r in request.requests])
                contexts = [dataclasses.replace(ctx, quota_ticket=t) for t in admission.tickets]
            tasks = [asyncio.ensure_future(c.complete(chat_input(r), cx))
                     for c, r, cx in zip(cores, request.requests, contexts, strict=True)]
            done = await asyncio.gather(*tasks)
            return gateway_pb2.BatchChatResponse(responses=[unary_response(c, "") for c in done])
        except ChatError as err:
            error = err
        except Exception:
            error = internal_error("BatchChat")
        finally:
            for t in tasks:
                t.cancel()
            if admission is not None:
                admission.close()
        await abort(context, error)

    async def CreateSession(self, request, context) -> gateway_pb2.Session:
        system = request.system_message if request.HasField("system_message") else None
        try:
            return session_proto(await self.core.create_session(system, request.ttl_seconds or None,
                                                                self._context(context).tenant))
        except ChatError as err:
            error = err
        await abort(context, error)

    async def GetSession(self, request, context) -> gateway_pb2.Session:
        try:
            return session_proto(await self.core.get_session(request.session_id, self._context(context).tenant))
        except ChatError as err:
            error = err
        await abort(context, error)

    async def DeleteSession(self, request, context) -> gateway_pb2.DeleteSessionResponse:
        try:
            await self.core.delete_session(request.session_id, self._context(context).tenant)
            return gateway_pb2.DeleteSessionResponse()
        except ChatError as err:
            error = err
        await abort(context, error)

    def _context(self, context) -> RequestContext:
        remaining = context.time_remaining()
        timeout = self.core.config.default_timeout_s if remaining is None else max(remaining, 0.001)
        request_id = next((v for k, v in (context.invocation_metadata() or ()) if k == "x-request-id"), "")
        return RequestContext(timeout_s=timeout, request_id=request_id,
                              tenant=tenant_of(context, ANONYMOUS_TENANT))


def chat_input(request: gateway_pb2.ChatRequest) -> ChatInput:
    t = request.tiling
    video = None
    if request.HasField("video"):
        v = request.video
        video = VideoInput(v.data, v.num_segments, v.start_seconds if v.HasField("start_seconds") else None,
                           v.end_seconds if v.HasField("end_seconds") else None)
    turn = UserTurn(
        text=request.text,
        images=tuple(img.data for img in request.images),
        video=video,
        combined=request.image_layout == gateway_pb2.IMAGE_LAYOUT_COMBINED,
        tiling=TilingRequest(t.max_tiles, t.min_tiles, t.use_thumbnail if t.HasField("use_thumbnail") else None),
    )
    return ChatInput(turn=turn, sampling=sampling(request.generation), session_id=request.session_id)


def sampling(p: decoder_pb2.SamplingParams) -> Sampling:
    def opt(name: str):
        return getattr(p, name) if p.HasField(name) else None

    return Sampling(max_new_tokens=p.max_new_tokens, do_sample=p.do_sample, temperature=opt("temperature"),
                    top_p=opt("top_p"), top_k=opt("top_k"), repetition_penalty=opt("repetition_penalty"),
                    seed=opt("seed"), stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids))


def _end_fields(end: TurnEnd | None) -> dict:
    if end is None:
        return {}
    u = end.usage
    return {
        "finish_reason": _FINISH[end.finish_reason],
        "usage": decoder_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                   cached_prompt_tokens=u.cached_prompt_tokens),
        "boxes": [gateway_pb2.GroundingBox(label=b.label, image_index=b.image_index, x1=b.x1, y1=b.y1, x2=b.x2,
                                           y2=b.y2, normalized=b.normalized) for b in end.boxes],
    }


def stream_response(event: ChatEvent, session_id: str) -> gateway_pb2.ChatStreamResponse:
    return gateway_pb2.ChatStreamResponse(text=event.text, session_id=session_id, **_end_fields(event.end))


def unary_response(done: Completion, session_id: str) -> gateway_pb2.ChatResponse:
    return gateway_pb2.ChatResponse(text=done.text, session_id=session_id, **_end_fields(done.end))


def session_proto(session: Session) -> gateway_pb2.Session:
    return gateway_pb2.Session(
        session_id=session.session_id,
        system_message=session.system_message or "",
        turns=[gateway_pb2.SessionTurn(user=t.user, assistant=t.assistant, image_hashes=list(t.image_hashes))
               for t in session.turns],
        expires_at_unix=int(session.expires_at),
    )
