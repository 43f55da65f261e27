"""One chat turn, whatever the transport: the gRPC servicer and the HTTP app are thin fronts over it.

A front turns its request into a `ChatInput` (plain dataclasses), calls `ChatCore.chat`, and turns
the `ChatEvent`s it yields into its own messages; a `ChatError` carries an `ErrorKind` that each
front maps to its own status (gRPC code, HTTP status).

One turn: resolve the history (a stored session, or earlier turns the client sent along), get the new
images' features (feature cache hit, or one encoder call per new image, single-flight per key; a
video encoded at most once), send the conversation to a decoder with the embeddings it asks for (the
lazy-images conversation, gateway/decoder_exchange.py: a session's earlier images are loaded, from
the feature cache or re-encoded, only when the decoder no longer holds their KV), stream its deltas,
and store the finished turn in the session before the last event goes out (a client that saw the end
can rely on the turn being in the session).

Failures:
- a request the client must fix: INVALID_ARGUMENT, checked here before any image is encoded wherever
  the gateway can tell (sizes, counts, tiling, placeholders, sampling ranges); what only a peer can
  tell (an undecodable image, a prompt beyond the decoder's context) comes back with the peer's message;
- an unknown or expired session: NOT_FOUND;
- a peer down: UNAVAILABLE at once; a peer overloaded: OVERLOADED with the peer's retry hint;
- Redis down or full: one-off chats are served without the feature cache; session calls get
  UNAVAILABLE (a turn must not be answered from a history the gateway cannot read or extend);
- anything else: INTERNAL, logged.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from gateway import decoder_exchange
from gateway.budget import BudgetError, DecoderFacts, EncoderFacts, check_turn_budget
from gateway.config import GatewayConfig
from gateway.decoder_pool import DecoderPool, NoReplicas, RoutedDecoder
from gateway.feature_cache import (
    Entry,
    FeatureCache,
    feature_key_for_hash,
    file_sha256,
    video_frame_key_for_hash,
)
from gateway.grounding import GroundingBox, ImageSize, image_size, parse_boxes
from gateway.image_slots import ImageSlot, SlotMismatch, combine_slots, combined_key
from gateway.peers import EncoderClient, PeerProtocolError
from gateway.placeholders import PlaceholderError, place_images, text_only_problem
from gateway.router import affinity_key
from gateway.sessions import (
    ImageRef,
    Session,
    SessionError,
    SessionNotFound,
    SessionStore,
    SessionStoreFull,
    SessionStoreUnavailable,
    SessionTooLarge,
    Turn,
    VideoSampling,
    new_session_id,
    owner_hash,
    session_prefix,
)
from gateway.transfer_stats import TransferStats
from gateway.video_once import VideoEncodes
from internvl.v1 import decoder_pb2, gateway_pb2, vision_pb2
from services.common.limits import (
    DEFAULT_VIDEO_MAX_TILES,
    DEFAULT_VIDEO_SEGMENTS,
    Tiling,
    resolve_tiling,
    sampling_problem,
    video_segments_problem,
)
from services.common.security import ANONYMOUS_TENANT, redact_addresses

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"  # the peers' trailing metadata with their retry hint


# ---------------------------------------------------------------------------------------------- errors


class ErrorKind(enum.Enum):
    """What went wrong, in words every front can map to its own status."""

    INVALID_ARGUMENT = "invalid_argument"  # the client must change the request
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"  # a stored session is full
    OVERLOADED = "overloaded"  # a peer's queue is full: retry later
    STORE_FULL = "store_full"  # the session store is full (it never evicts): nothing stored was lost
    UNAVAILABLE = "unavailable"  # a peer or the session store is down
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    FAILED_PRECONDITION = "failed_precondition"
    QUOTA_EXCEEDED = "quota_exceeded"  # the tenant's quota (gateway/quotas.py): retry later, or free sessions
    INTERNAL = "internal"


class ChatError(Exception):
    """The request fails with this kind and message; `param` names the offending field when known."""

    def __init__(self, kind: ErrorKind, message: str, *, retry_after_ms: int | None = None, param: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.param = param


def internal_error(what: str) -> ChatError:
    log.exception("%s failed", what)
    return ChatError(ErrorKind.INTERNAL, f"the gateway failed on this request ({what}); see its logs")


_PEER_KINDS = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorKind.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorKind.OVERLOADED,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorKind.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED: ErrorKind.CANCELLED,
    grpc.StatusCode.UNAVAILABLE: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorKind.FAILED_PRECONDITION,
}


def peer_error(peer: str, err: grpc.aio.AioRpcError) -> ChatError:
    """The client's error for a failed peer call. gRPC's details may name the peer's address
    (`ipv4:10.0.3.7:50053`): the log keeps them, the client's message has them redacted."""
    code = err.code()
    kind = _PEER_KINDS.get(code)
    details = err.details() or ""
    if kind is not ErrorKind.INVALID_ARGUMENT:
        log.warning("%s failed: %s: %s", peer, code.name, details)
    details = redact_addresses(details)
    if kind is None:
        return ChatError(ErrorKind.INTERNAL, f"{peer} failed: {code.name}: {details}")
    # Keep the peer's retry hint: the client, not the gateway, decides when to come back.
    hint = next((v for k, v in (err.trailing_metadata() or ()) if k == RETRY_AFTER_KEY), None)
    retry_after_ms = int(hint) if hint is not None and str(hint).isdigit() else None
    return ChatError(kind, f"{peer}: {details}", retry_after_ms=retry_after_ms)


def session_not_found(session_id: str) -> ChatError:
    """One message for unknown, expired, deleted and another tenant's sessions: it tells nothing apart."""
    return ChatError(ErrorKind.NOT_FOUND, f"session {session_prefix(session_id)} not found (expired or deleted)")


def session_error(exc: SessionError) -> ChatError:
    if isinstance(exc, SessionNotFound):
        return ChatError(ErrorKind.NOT_FOUND, str(exc))
    if isinstance(exc, SessionTooLarge):
        return ChatError(ErrorKind.TOO_LARGE, str(exc))
    # Redis errors name the store's address (`connecting to 10.0.2.5:6379`): logged, redacted for the client.
    log.warning("session store: %s", exc)
    detail = redact_addresses(str(exc))
    if isinstance(exc, SessionStoreFull):
        return ChatError(ErrorKind.STORE_FULL, detail)
    if isinstance(exc, SessionStoreUnavailable):
        return ChatError(ErrorKind.UNAVAILABLE, f"session store unavailable: {detail}")
    return ChatError(ErrorKind.INTERNAL, f"session store error: {detail}")


# ---------------------------------------------------------------------------------------------- input


@dataclass(frozen=True)
class RequestContext:
    """Who asks and by when: what every call into the core carries besides its input.

    `tenant` is the name of the API key that authenticated the call (ANONYMOUS_TENANT on an
    --insecure-open gateway): sessions belong to it. The core passes the context to every peer call.
    """

    timeout_s: float  # the time left for the whole turn
    request_id: str = ""
    tenant: str = ANONYMOUS_TENANT
    quota_ticket: Any = None  # a gateway.quotas.Ticket when the front admitted this call with others

    def peer_metadata(self) -> list[tuple[str, str]]:
        """Propagate the request id to the peers so logs of one request can be joined."""
        return [("x-request-id", self.request_id)] if self.request_id else []


@dataclass(frozen=True)
class TilingRequest:
    """Tiling as asked: 0 / None = the model's default (for video frames: one tile)."""

    max_tiles: int = 0
    min_tiles: int = 0
    use_thumbnail: bool | None = None


@dataclass(frozen=True)
class VideoInput:
    data: bytes
    num_segments: int = 0  # 0 = DEFAULT_VIDEO_SEGMENTS
    start_seconds: float | None = None
    end_seconds: float | None = None


@dataclass(frozen=True)
class UserTurn:
    """A user message: text with optional `<image>` placeholders, and its images or one video."""

    text: str
    images: tuple[bytes, ...] = ()
    video: VideoInput | None = None
    combined: bool = False  # all images' tiles behind one placeholder (upstream num_patches_list=None)
    tiling: TilingRequest = TilingRequest()


@dataclass(frozen=True)
class PastTurn:
    """An earlier round a stateless client sends along: rendered as upstream renders history."""

    user: UserTurn
    assistant: str


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; None = the decoder's default (greedy unless `do_sample`)."""

    max_new_tokens: int = 0  # 0 = the server default
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def problem(self) -> str | None:
        return sampling_problem(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k, repetition_penalty=self.repetition_penalty, stop=self.stop,
                                stop_token_ids=self.stop_token_ids)

    def proto(self) -> decoder_pb2.SamplingParams:
        p = decoder_pb2.SamplingParams(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                       stop=list(self.stop), stop_token_ids=list(self.stop_token_ids))
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(p, name, value)
        return p


@dataclass(frozen=True)
class ChatInput:
    """One turn. History is a stored session (`session_id`) or what the client sends
    (`system_message`, `history`), never both."""

    turn: UserTurn
    sampling: Sampling = Sampling()
    session_id: str = ""
    system_message: str | None = None
    history: tuple[PastTurn, ...] = ()


# ---------------------------------------------------------------------------------------------- output


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class TurnEnd:
    finish_reason: str  # "stop" (end of turn, stop token or string) or "length" (max_new_tokens)
    usage: Usage
    boxes: tuple[GroundingBox, ...] = ()  # grounding boxes parsed from the whole answer


@dataclass(frozen=True)
class ChatEvent:
    """A text delta; the last event of a turn also carries `end`."""

    text: str
    end: TurnEnd | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    end: TurnEnd


_FINISH = {decoder_pb2.FINISH_REASON_STOP: "stop", decoder_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass
class _Feature:
    """One image block for the decoder: its embeddings and the key that names them."""

    key: str
    entry: Entry


@dataclass
class _TurnMedia:
    """A user turn's image blocks, and what a session stores of them."""

    features: list[_Feature] = field(default_factory=list)
    refs: list[ImageRef] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- the core


class ChatCore:
    def __init__(
        self,
        config: GatewayConfig,
        encoder: EncoderClient,
        decoder: DecoderPool,
        cache: FeatureCache,
        sessions: SessionStore,
        quotas: Any = None,  # gateway.quotas.TenantQuotas; None = no quotas
        transfer: TransferStats | None = None,  # shared by the cores of one gateway (one set of counters)
    ):
        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        self.cache = cache
        self.sessions = sessions
        self.transfer = transfer or TransferStats()  # embedding bytes per hop (gateway/transfer_stats.py)
        self.quotas = quotas

    # ------------------------------------------------------------------ chat

    async def complete(self, request: ChatInput, ctx: RequestContext) -> Completion:
        text: list[str] = []
        end = None
        async for event in self.chat(request, ctx):
            text.append(event.text)
            end = event.end
        if end is None:
            raise ChatError(ErrorKind.INTERNAL, "language decoder: the answer stream ended without a finish reason")
        return Completion("".join(text), end)

    async def chat(self, request: ChatInput, ctx: RequestContext) -> AsyncIterator[ChatEvent]:
        """The turn's text deltas; the last event carries the finish reason, usage and boxes."""
        self.validate(request)  # before the quota: an invalid request costs the tenant nothing
        events = self._turn(request, ctx)
        if self.quotas is not None:
            events = self.quotas.metered(ctx, request.sampling.max_new_tokens, events)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    async def _turn(self, request: ChatInput, ctx: RequestContext) -> AsyncIterator[ChatEvent]:
        session = await self._require_session(request.session_id, ctx.tenant, adding=True) \
            if request.session_id else None
        # Placeholders first: a malformed request costs no encoding.
        past_questions = [self._question(t.user) for t in request.history]
        question = self._question(request.turn)
        await self._check_budget(request, session, ctx)

        videos = VideoEncodes()
        try:
            async for event in self._chat(request, ctx, session, past_questions, question, videos):
                yield event
        finally:
            videos.close()

    async def _chat(self, request: ChatInput, ctx: RequestContext, session: Session | None,
                    past_questions: list[str], question: str, videos: VideoEncodes) -> AsyncIterator[ChatEvent]:
        slots: list[ImageSlot] = []
        if session is not None:
            slots = await self._session_slots(session, ctx, videos)
        for past in request.history:
            slots += _slots(self._blocks(past.user, await self._turn_media(past.user, ctx, videos)))
        media = await self._turn_media(request.turn, ctx, videos)
        slots += _slots(self._blocks(request.turn, media))

        if session is not None:
            history = [decoder_pb2.Turn(user=t.user, assistant=t.assistant) for t in session.turns]
            system = session.system_message
        else:
            history = [decoder_pb2.Turn(user=q, assistant=t.assistant)
                       for q, t in zip(past_questions, request.history, strict=True)]
            system = request.system_message
        conversation = decoder_pb2.Conversation(history=history, question=question)
        if system is not None:
            conversation.system_message = system
        setup = decoder_pb2.GenerateSetup(
            conversation=conversation,
            sampling=request.sampling.proto(),
            images=[slot.descriptor() for slot in slots],
            cache_salt=self.cache_scope(ctx),  # text-only prefixes too: the feature keys cover images only
        )
        sizes = self._image_sizes(request.turn)
        decoder = self._route(request, ctx, slots)
        lazy = bool(slots) and self.config.lazy_images and (
            await self._call_peer("language decoder", decoder.model_info(ctx.timeout_s))).lazy_images
        call = decoder_exchange.generate(decoder, setup, slots, lazy=lazy, stats=self.transfer,
                                         timeout=ctx.timeout_s, metadata=ctx.peer_metadata())
        answer: list[str] = []
        try:
            async for resp in call:
                answer.append(resp.text)
                if resp.finish_reason == decoder_pb2.FINISH_REASON_UNSPECIFIED:
                    yield ChatEvent(resp.text)
                    continue
                text = "".join(answer)
                if session is not None:
                    turn = Turn(user=question, assistant=text, images=tuple(media.refs),
                                image_layout=_layout(request.turn))
                    await self._store_turn(session, turn, media.files, ctx.tenant)
                u = resp.usage
                end = TurnEnd(_FINISH.get(resp.finish_reason, "stop"),
                              Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens),
                              tuple(parse_boxes(text, sizes)))
                yield ChatEvent(resp.text, end)
        except grpc.aio.AioRpcError as err:
            raise peer_error("language decoder", err) from err
        except (PeerProtocolError, SlotMismatch) as exc:
            log.warning("language decoder: %s", exc)
            raise ChatError(ErrorKind.INTERNAL, f"language decoder: {redact_addresses(str(exc))}") from exc
        finally:
            await call.aclose()  # cancels the call: stops generation if our client went away

    def validate(self, request: ChatInput) -> None:
        """Everything the gateway can check before any work; ChatError(INVALID_ARGUMENT) says what to fix."""
        cfg = self.config

        def bad(message: str, param: str | None = None) -> ChatError:
            return ChatError(ErrorKind.INVALID_ARGUMENT, message, param=param)

        if request.session_id and (request.history or request.system_message is not None):
            raise bad("a turn takes its history from a session or from the request, not both")
        turns = [p.user for p in request.history] + [request.turn]
        turn = request.turn
        if not turn.text.strip() and not turn.images and turn.video is None:
            raise bad("the request has no text, image or video")
        total_images = 0
        for t in turns:
            if len(t.text.encode()) > cfg.max_text_bytes:
                raise bad(f"text is longer than {cfg.max_text_bytes} bytes")
            if t.images and t.video is not None:
                raise bad("send images or a video, not both")
            total_images += len(t.images)
            for i, img in enumerate(t.images):
                if not img:
                    raise bad(f"image {i} is empty")
                if len(img) > cfg.max_image_bytes:
                    raise bad(f"image {i} is {len(img)} bytes; the limit is {cfg.max_image_bytes}")
            if t.video is not None:
                if not t.video.data:
                    raise bad("the video is empty")
                if len(t.video.data) > cfg.max_video_bytes:
                    raise bad(f"the video is {len(t.video.data)} bytes; the limit is {cfg.max_video_bytes}")
                problem = video_segments_problem(t.video.num_segments)
                if problem:
                    raise bad(problem)
        if total_images > cfg.max_images_per_request:
            raise bad(f"{total_images} images; at most {cfg.max_images_per_request} per request")
        for past in request.history:
            if len(past.assistant.encode()) > cfg.max_text_bytes:
                raise bad(f"an assistant message is longer than {cfg.max_text_bytes} bytes")
            problem = text_only_problem(past.assistant, "an assistant message")
            if problem:
                raise bad(problem)
        if request.system_message is not None:
            if len(request.system_message.encode()) > cfg.max_text_bytes:
                raise bad(f"the system message is longer than {cfg.max_text_bytes} bytes")
            problem = text_only_problem(request.system_message, "the system message")
            if problem:
                raise bad(problem)
        problem = request.sampling.problem()
        if problem:
            fields = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "stop_token_ids", "stop")
            raise bad(problem, next((f for f in fields if problem.startswith(f) or f"{f} " in problem), None))
        if request.sampling.max_new_tokens > cfg.max_new_tokens:  # the longest generation a drain covers
            raise bad(f"max_new_tokens must be <= {cfg.max_new_tokens} (this gateway's --max-new-tokens), "
                      f"got {request.sampling.max_new_tokens}", "max_new_tokens")

    async def _check_budget(self, request: ChatInput, session: Session | None, ctx: RequestContext) -> None:
        """Refuse, before any encode, images the encoder or the decoder's context cannot take."""
        turns = [p.user for p in request.history] + [request.turn]
        stored = [ref.num_tiles for t in session.turns for ref in t.images] if session is not None else []
        if not stored and not any(t.images or t.video is not None for t in turns):
            return
        encoder = await self._call_peer("vision encoder", self.encoder.model_info(ctx.timeout_s))
        decoder = await self._call_peer("language decoder", self.decoder.model_info(ctx.timeout_s))
        try:
            check_turn_budget(turns, stored, request.sampling.max_new_tokens, EncoderFacts.of(encoder),
                              DecoderFacts.of(decoder))
        except BudgetError as exc:
            raise ChatError(ErrorKind.INVALID_ARGUMENT, str(exc)) from exc

    @staticmethod
    def _question(turn: UserTurn) -> str:
        video = turn.video is not None
        num_items = (turn.video.num_segments or DEFAULT_VIDEO_SEGMENTS) if video else len(turn.images)
        try:
            return place_images(turn.text, num_items=num_items, combined=turn.combined, video=video)
        except PlaceholderError as exc:
            raise ChatError(ErrorKind.INVALID_ARGUMENT, str(exc)) from exc

    @staticmethod
    def _image_sizes(turn: UserTurn) -> list[ImageSize | None]:
        """Pixel sizes of the turn's images (grounding boxes); None for a file whose header is unreadable."""
        return [image_size(data) for data in turn.images]

    @staticmethod
    def _blocks(turn: UserTurn, media: _TurnMedia) -> list[_Feature]:
        return _combine(media.features) if turn.combined and turn.video is None else media.features

    # ------------------------------------------------------------------ sessions

    async def create_session(self, system_message: str | None, ttl_s: int | None, tenant: str) -> Session:
        if system_message is not None and len(system_message.encode()) > self.config.max_text_bytes:
            raise ChatError(ErrorKind.INVALID_ARGUMENT,
                            f"system_message is longer than {self.config.max_text_bytes} bytes")
        problem = text_only_problem(system_message or "", "system_message")
        if problem:
            raise ChatError(ErrorKind.INVALID_ARGUMENT, problem)
        session_id = new_session_id()
        if self.quotas is not None:
            ttl_s = self.quotas.session_ttl(tenant, ttl_s)
            await self.quotas.open_session(tenant, session_id, ttl_s, len((system_message or "").encode()))
        try:
            return await self.sessions.create(system_message, ttl_s, owner=owner_hash(tenant), session_id=session_id)
        except (ValueError, SessionError) as exc:
            if self.quotas is not None:
                await self.quotas.close_session(tenant, session_id)
            if isinstance(exc, ValueError):
                raise ChatError(ErrorKind.INVALID_ARGUMENT, str(exc)) from exc
            raise session_error(exc) from exc

    async def get_session(self, session_id: str, tenant: str) -> Session:
        if not session_id:
            raise ChatError(ErrorKind.INVALID_ARGUMENT, "session_id is required")
        return await self._require_session(session_id, tenant)

    async def delete_session(self, session_id: str, tenant: str) -> None:
        if not session_id:
            raise ChatError(ErrorKind.INVALID_ARGUMENT, "session_id is required")
        if not await self._sessions_call(self.sessions.delete(session_id, owner=owner_hash(tenant))):
            raise session_not_found(session_id)
        if self.quotas is not None:
            await self.quotas.close_session(tenant, session_id)

    async def _require_session(self, session_id: str, tenant: str, *, adding: bool = False) -> Session:
        """The tenant's session; another tenant's is NOT_FOUND with the very message of an unknown id.
        `adding`: a turn is about to be generated for it (refused first if the tenant's sessions are full)."""
        session = await self._sessions_call(self.sessions.get(session_id, owner=owner_hash(tenant)))
        if session is None:
            raise session_not_found(session_id)
        if self.quotas is not None:  # the read restarted the session's TTL: its quota entry follows
            await self.quotas.session_used(tenant, session_id, session.ttl_s, adding=adding)
        return session

    async def _store_turn(self, session: Session, turn: Turn, files: dict[str, bytes], tenant: str) -> None:
        session_id = session.session_id
        stored = await self._sessions_call(self.sessions.get_images(session_id, list(files)))
        new_files = {h: d for h, d in files.items() if h not in stored}
        size = len(turn.user.encode()) + len(turn.assistant.encode()) + sum(len(d) for d in new_files.values())
        if self.quotas is not None:
            await self.quotas.charge_session(tenant, session_id, session.ttl_s, size)
        try:
            await self._sessions_call(self.sessions.append_turn(session_id, turn, new_files))
        except BaseException:
            if self.quotas is not None:
                await self.quotas.charge_session(tenant, session_id, session.ttl_s, -size)
            raise

    async def _sessions_call(self, awaitable):
        try:
            return await awaitable
        except SessionError as exc:
            raise session_error(exc) from exc

    # ------------------------------------------------------------------ features

    async def _turn_media(self, turn: UserTurn, ctx: RequestContext, videos: VideoEncodes) -> _TurnMedia:
        if turn.video is None and not turn.images:
            return _TurnMedia()
        info = await self._call_peer("vision encoder", self.encoder.model_info(ctx.timeout_s))
        if turn.video is not None:
            return await self._video_media(turn, info, ctx, videos)
        return await self._image_media(turn, info, ctx)

    async def _image_media(self, turn: UserTurn, info, ctx: RequestContext) -> _TurnMedia:
        tiling = self._tiling(turn.tiling, info, default_max=info.default_max_tiles)
        hashes = [file_sha256(data) for data in turn.images]
        scope = self.cache_scope(ctx)
        keys = [self._image_key(h, tiling, info, scope) for h in hashes]

        async def one(data: bytes, key: str) -> _Feature:
            entry = await self._cached(key, lambda: self._encode_image(data, tiling, ctx))
            return _Feature(key, entry)

        features = await asyncio.gather(*(one(d, k) for d, k in zip(turn.images, keys, strict=True)))
        refs = [ImageRef(h, tiling.max_tiles, tiling.min_tiles, tiling.use_thumbnail, f.entry.num_tiles)
                for h, f in zip(hashes, features, strict=True)]
        return _TurnMedia(list(features), refs, dict(zip(hashes, turn.images, strict=True)))

    async def _video_media(self, turn: UserTurn, info, ctx: RequestContext, videos: VideoEncodes) -> _TurnMedia:
        v = turn.video
        tiling = self._tiling(turn.tiling, info, default_max=DEFAULT_VIDEO_MAX_TILES)
        sampling = VideoSampling(num_segments=v.num_segments or DEFAULT_VIDEO_SEGMENTS,
                                 start_seconds=v.start_seconds, end_seconds=v.end_seconds)
        video_hash = file_sha256(v.data)
        scope = self.cache_scope(ctx)
        keys = [self._frame_key(video_hash, i, sampling, tiling, info, scope) for i in range(sampling.num_segments)]
        entries = await self._video_entries(v.data, keys, sampling, tiling, ctx, videos)
        features = [_Feature(k, e) for k, e in zip(keys, entries, strict=True)]
        refs = [ImageRef(video_hash, tiling.max_tiles, tiling.min_tiles, tiling.use_thumbnail, e.num_tiles,
                         video=sampling, frame_index=i) for i, e in enumerate(entries)]
        return _TurnMedia(features, refs, {video_hash: v.data})

    async def _video_entries(self, data, keys, sampling, tiling, ctx, videos: VideoEncodes) -> list[Entry]:
        """All frames' features: from the cache where it has them, the rest from one encoder call."""
        async def encode_all() -> Entry:
            frames = await self._video_frames(data, keys[0], sampling, tiling, ctx, videos)
            await asyncio.gather(*(self.cache.put(k, e) for k, e in zip(keys[1:], frames[1:], strict=True)))
            return frames[0]

        # Single-flight on the first frame's key covers the whole video.
        first = await self._cached(keys[0], encode_all)
        if videos.encoded(keys[0]):  # encoded here: every frame is at hand, no cache round trips
            return await self._video_frames(data, keys[0], sampling, tiling, ctx, videos)
        rest = await asyncio.gather(*(
            self._cached(key, lambda i=i: self._frame_from_video(data, keys[0], i, sampling, tiling, ctx, videos))
            for i, key in enumerate(keys) if i))
        return [first, *rest]

    async def _session_slots(self, session: Session, ctx: RequestContext, videos: VideoEncodes) -> list[ImageSlot]:
        """Every image block of earlier turns, described from the session; loaded (feature cache, else
        re-encoded from the stored bytes) only when the decoder asks for it."""
        if not any(turn.images for turn in session.turns):
            return []
        info = await self._call_peer("vision encoder", self.encoder.model_info(ctx.timeout_s))
        scope = self.cache_scope(ctx)
        slots: list[ImageSlot] = []
        for turn in session.turns:
            turn_slots: list[ImageSlot] = []
            for ref in turn.images:
                tiling = Tiling(ref.max_tiles, ref.min_tiles, ref.use_thumbnail)
                if ref.video is not None:
                    key = self._frame_key(ref.content_hash, ref.frame_index, ref.video, tiling, info, scope)
                    video_key = self._frame_key(ref.content_hash, 0, ref.video, tiling, info, scope)
                else:
                    key, video_key = self._image_key(ref.content_hash, tiling, info, scope), ""

                async def load(key=key, ref=ref, tiling=tiling, video_key=video_key) -> Entry:
                    return await self._cached(key, lambda: self._reencode(session.session_id, ref, tiling, video_key,
                                                                          ctx, videos))

                if ref.num_tiles:
                    shape = (ref.num_tiles, info.tokens_per_tile, info.hidden_size)
                    turn_slots.append(ImageSlot(key, info.dtype, shape, load))
                else:  # a session stored before tiles were recorded: load now to learn the shape
                    turn_slots.append(ImageSlot.of(key, await load()))
            if turn.image_layout == gateway_pb2.IMAGE_LAYOUT_COMBINED and turn.images and turn.images[0].video is None:
                turn_slots = combine_slots(turn_slots)
            slots.extend(turn_slots)
        return slots

    async def _reencode(self, session_id: str, ref: ImageRef, tiling: Tiling, video_key: str, ctx: RequestContext,
                        videos: VideoEncodes) -> Entry:
        data = await self._sessions_call(self.sessions.get_image(session_id, ref.content_hash))
        if data is None:
            raise ChatError(ErrorKind.FAILED_PRECONDITION,
                            f"session {session_prefix(session_id)}: an earlier image's features and bytes are "
                            "both gone")
        if ref.video is not None:
            return await self._frame_from_video(data, video_key, ref.frame_index, ref.video, tiling, ctx, videos)
        return await self._encode_image(data, tiling, ctx)

    async def _encode_image(self, data: bytes, tiling: Tiling, ctx: RequestContext) -> Entry:
        req = vision_pb2.EncodeRequest(images=vision_pb2.ImageList(images=[vision_pb2.ImageInput(data=data)]),
                                       tiling=_tiling_proto(tiling))
        items = await self._call_peer("vision encoder", self.encoder.encode(
            req, timeout=ctx.timeout_s, metadata=ctx.peer_metadata()))
        self.transfer.encoder_received_bytes += sum(entry.nbytes for _, entry in items)
        return items[0][1]

    async def _encode_video(self, data: bytes, sampling: VideoSampling, tiling: Tiling,
                            ctx: RequestContext) -> list[Entry]:
        video = vision_pb2.VideoInput(data=data, num_segments=sampling.num_segments)
        if sampling.start_seconds is not None:
            video.start_seconds = sampling.start_seconds
        if sampling.end_seconds is not None:
            video.end_seconds = sampling.end_seconds
        req = vision_pb2.EncodeRequest(video=video, tiling=_tiling_proto(tiling))
        items = await self._call_peer("vision encoder", self.encoder.encode(
            req, timeout=ctx.timeout_s, metadata=ctx.peer_metadata()))
        self.transfer.encoder_received_bytes += sum(entry.nbytes for _, entry in items)
        return [entry for _, entry in items]

    async def _video_frames(self, data, video_key, sampling, tiling, ctx, videos: VideoEncodes) -> list[Entry]:
        """Every sampled frame of a video, encoded at most once per request (`video_key`: frame 0's key)."""
        frames = await videos.frames(video_key, lambda: self._encode_video(data, sampling, tiling, ctx))
        if len(frames) != sampling.num_segments:
            raise ChatError(ErrorKind.INTERNAL,
                            f"encoder returned {len(frames)} frames, expected {sampling.num_segments}")
        return frames

    async def _frame_from_video(self, data, video_key, index, sampling, tiling, ctx, videos: VideoEncodes) -> Entry:
        return (await self._video_frames(data, video_key, sampling, tiling, ctx, videos))[index]

    async def _cached(self, key: str, compute: Callable[[], Awaitable[Entry]]) -> Entry:
        return (await self.cache.get_or_compute(key, compute))[0]

    # ------------------------------------------------------------------ helpers

    def _route(self, request: ChatInput, ctx: RequestContext, slots: Sequence[ImageSlot]) -> RoutedDecoder:
        """The decoder replica most likely to hold this turn's KV (gateway/router.py)."""
        first = request.history[0].user if request.history else request.turn
        key = affinity_key(self.cache_scope(ctx), session_id=request.session_id,
                           leading_feature_key=slots[0].key if slots else "",
                           leading_text=f"{request.system_message or ''}\x00{first.text}")
        try:
            return self.decoder.route(key)
        except NoReplicas as exc:
            raise ChatError(ErrorKind.UNAVAILABLE, f"language decoder: {exc}") from exc

    def cache_scope(self, ctx: RequestContext) -> str:
        """The tenant's scope in the feature cache and the decoder's prefix cache ('' = shared by all).

        Scoped by default: a shared cache answers a tenant's request faster, and with more
        `cached_prompt_tokens`, when anyone sent the same image or prompt prefix before, which tells
        one tenant what another sent. `--share-caches-across-tenants` trades that away for hit rate.
        """
        if self.config.share_caches_across_tenants:
            return ""
        return hashlib.sha256(f"ivl-cache-scope:{ctx.tenant}".encode()).hexdigest()[:32]

    @staticmethod
    def _image_key(image_hash: str, tiling: Tiling, info, scope: str) -> str:
        return feature_key_for_hash(
            image_hash, max_tiles=tiling.max_tiles, min_tiles=tiling.min_tiles,
            use_thumbnail=tiling.use_thumbnail, image_size=info.image_size, model_fingerprint=_tower(info),
            scope=scope,
        )

    @staticmethod
    def _frame_key(video_hash: str, index: int, sampling: VideoSampling, tiling: Tiling, info, scope: str) -> str:
        return video_frame_key_for_hash(
            video_hash, frame_index=index, num_segments=sampling.num_segments,
            start_seconds=sampling.start_seconds, end_seconds=sampling.end_seconds,
            max_tiles=tiling.max_tiles, min_tiles=tiling.min_tiles, use_thumbnail=tiling.use_thumbnail,
            image_size=info.image_size, model_fingerprint=_tower(info), scope=scope,
        )

    @staticmethod
    def _tiling(options: TilingRequest, info, default_max: int) -> Tiling:
        try:
            return resolve_tiling(options.max_tiles, options.min_tiles, options.use_thumbnail,
                                  default_max_tiles=default_max, default_use_thumbnail=info.default_use_thumbnail)
        except ValueError as exc:
            raise ChatError(ErrorKind.INVALID_ARGUMENT, str(exc)) from exc

    @staticmethod
    async def _call_peer(peer: str, awaitable):
        try:
            return await awaitable
        except grpc.aio.AioRpcError as err:
            raise peer_error(peer, err) from err
        except PeerProtocolError as exc:
            log.warning("%s: %s", peer, exc)
            raise ChatError(ErrorKind.INTERNAL, f"{peer}: {redact_addresses(str(exc))}") from exc


def _tower(info: vision_pb2.ModelInfo) -> str:
    """What cached features are keyed by: the encoder's vision tower + projector, so deployments whose
    encoders compute the same features share them (older encoders: their whole checkpoint)."""
    return info.vision_fingerprint or info.fingerprint


def _layout(turn: UserTurn) -> int:
    """How a session stores the turn's layout (gateway_pb2.ImageLayout)."""
    return gateway_pb2.IMAGE_LAYOUT_COMBINED if turn.combined else gateway_pb2.IMAGE_LAYOUT_SEPARATE


def _tiling_proto(tiling: Tiling) -> vision_pb2.TilingOptions:
    return vision_pb2.TilingOptions(max_tiles=tiling.max_tiles, min_tiles=tiling.min_tiles,
                                    use_thumbnail=tiling.use_thumbnail)


def _combine(features: Sequence[_Feature]) -> list[_Feature]:
    """All images' tiles as one block (upstream num_patches_list=None)."""
    if len(features) <= 1:
        return list(features)
    first = features[0].entry
    pieces = [piece for f in features for piece in f.entry.pieces]  # no copy: the chunks are relayed as they are
    shape = (sum(f.entry.num_tiles for f in features), *first.shape[1:])
    return [_Feature(combined_key([f.key for f in features]), Entry(first.dtype, shape, pieces))]


def _slots(features: Sequence[_Feature]) -> list[ImageSlot]:
    return [ImageSlot.of(f.key, f.entry) for f in features]
