"""The public API: orchestration only. Features come from Redis or the encoder, text from the decoder.

One chat turn: resolve the session (its earlier turns and their images), get every image's
features (cache hit, or one encoder call per new image, single-flight per key), send the
conversation with all image embeddings in placeholder order to a decoder, stream its deltas, and
store the finished turn before the last message goes out (a client that saw the end can rely on
the turn being in the session).

Failures, and what the client sees:
- a request it must fix: INVALID_ARGUMENT, checked here before any image is encoded wherever the
  gateway can tell (sizes, counts, tiling, placeholders, sampling ranges); what only a peer can
  tell (an undecodable image, a prompt beyond the decoder's context) comes back from that peer
  with the peer's message;
- an unknown or expired session: NOT_FOUND;
- a peer down: UNAVAILABLE at once (calls fail fast, they never wait for the deadline); the
  channel reconnects by itself when the peer is back;
- a peer overloaded: RESOURCE_EXHAUSTED, with the peer's `retry-after-ms` trailing metadata;
- Redis down or full: one-off chats are served without the feature cache; session calls get
  UNAVAILABLE (a turn must not be answered from a history the gateway cannot read or extend);
- anything else: INTERNAL, logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from gateway.clients import DecoderClient, EncoderClient, PeerProtocolError
from gateway.config import GatewayConfig
from gateway.feature_cache import (
    Entry,
    FeatureCache,
    content_hash,
    feature_key_for_hash,
    video_frame_key_for_hash,
)
from gateway.placeholders import PlaceholderError, place_images
from gateway.sessions import (
    ImageRef,
    Session,
    SessionError,
    SessionNotFound,
    SessionStore,
    SessionStoreUnavailable,
    SessionTooLarge,
    Turn,
    VideoSampling,
)
from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc, vision_pb2

log = logging.getLogger(__name__)

MAX_TILES_LIMIT = 40
DEFAULT_VIDEO_SEGMENTS = 8
PEER_CODES_PASSED_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
}


RETRY_AFTER_KEY = "retry-after-ms"


class RequestError(Exception):
    """Abort the call with this status, message and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing_metadata: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing_metadata = trailing_metadata

    async def abort(self, context) -> None:
        await context.abort(self.code, self.message, trailing_metadata=self.trailing_metadata)


def _internal(what: str) -> RequestError:
    log.exception("%s failed", what)
    return RequestError(grpc.StatusCode.INTERNAL, f"the gateway failed on this request ({what}); see its logs")


@dataclass(frozen=True)
class Tiling:
    max_tiles: int
    min_tiles: int
    use_thumbnail: bool

    def proto(self) -> vision_pb2.TilingOptions:
        return vision_pb2.TilingOptions(
            max_tiles=self.max_tiles, min_tiles=self.min_tiles, use_thumbnail=self.use_thumbnail
        )


@dataclass
class Feature:
    """One image block for the decoder: its embeddings and the key that names them."""

    key: str
    entry: Entry


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        config: GatewayConfig,
        encoder: EncoderClient,
        decoder: DecoderClient,
        cache: FeatureCache,
        sessions: SessionStore,
    ):
        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        self.cache = cache
        self.sessions = sessions

    # ------------------------------------------------------------------ RPCs

    async def ChatStream(self, request, context) -> AsyncIterator[gateway_pb2.ChatStreamResponse]:
        error = None
        try:
            async for part in self._chat(request, context):
                yield part
        except RequestError as err:
            error = err
        except Exception:
            error = _internal("ChatStream")
        if error is not None:  # outside the except blocks: context.abort raises
            await error.abort(context)

    async def Chat(self, request, context) -> gateway_pb2.ChatResponse:
        try:
            return await self._chat_unary(request, context)
        except RequestError as err:
            error = err
        except Exception:
            error = _internal("Chat")
        await error.abort(context)

    async def BatchChat(self, request, context) -> gateway_pb2.BatchChatResponse:
        n = len(request.requests)
        if not 1 <= n <= self.config.max_batch_size:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a batch holds 1..{self.config.max_batch_size} requests, got {n}")
        if any(r.session_id for r in request.requests):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch requests cannot use sessions")
        tasks = [asyncio.ensure_future(self._chat_unary(r, context)) for r in request.requests]
        try:
            return gateway_pb2.BatchChatResponse(responses=await asyncio.gather(*tasks))
        except RequestError as err:
            error = err
        except Exception:
            error = _internal("BatchChat")
        finally:
            for t in tasks:
                t.cancel()
        await error.abort(context)

    async def CreateSession(self, request, context) -> gateway_pb2.Session:
        system = request.system_message if request.HasField("system_message") else None
        if system is not None and len(system.encode()) > self.config.max_text_bytes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"system_message is longer than {self.config.max_text_bytes} bytes")
        try:
            session = await self.sessions.create(system, request.ttl_seconds or None)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except SessionError as exc:
            await context.abort(*_session_status(exc))
        return _session_proto(session)

    async def GetSession(self, request, context) -> gateway_pb2.Session:
        if not request.session_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is required")
        try:
            return _session_proto(await self._require_session(request.session_id))
        except RequestError as err:
            error = err
        await error.abort(context)

    async def DeleteSession(self, request, context) -> gateway_pb2.DeleteSessionResponse:
        if not request.session_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is required")
        try:
            deleted = await self.sessions.delete(request.session_id)
        except SessionError as exc:
            await context.abort(*_session_status(exc))
        if not deleted:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"session {request.session_id!r} not found")
        return gateway_pb2.DeleteSessionResponse()

    # ------------------------------------------------------------------ one turn

    async def _chat_unary(self, request, context) -> gateway_pb2.ChatResponse:
        text, last = [], None
        async for part in self._chat(request, context):
            text.append(part.text)
            last = part
        return gateway_pb2.ChatResponse(
            text="".join(text), finish_reason=last.finish_reason, usage=last.usage, session_id=last.session_id
        )

    async def _chat(self, request, context) -> AsyncIterator[gateway_pb2.ChatStreamResponse]:
        self._validate(request)
        timeout = self._timeout(context)
        metadata = _forwarded_metadata(context)
        session = await self._require_session(request.session_id) if request.session_id else None

        video = request.HasField("video")
        combined = request.image_layout == gateway_pb2.IMAGE_LAYOUT_COMBINED
        num_items = (request.video.num_segments or DEFAULT_VIDEO_SEGMENTS) if video else len(request.images)
        try:  # before any encoding: a malformed request costs nothing
            question = place_images(request.text, num_items=num_items, combined=combined, video=video)
        except PlaceholderError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        new_features: list[Feature] = []
        new_refs: list[ImageRef] = []
        new_files: dict[str, bytes] = {}
        if video or request.images:
            info = await self._call_peer("vision encoder", self.encoder.model_info(timeout))
            if video:
                new_features, new_refs, new_files = await self._video_features(request, info, timeout, metadata)
            else:
                new_features, new_refs, new_files = await self._image_features(request, info, timeout, metadata)
        history_features = await self._history_features(session, timeout, metadata) if session else []

        blocks = history_features + (_combine(new_features) if combined and not video else new_features)

        conversation = decoder_pb2.Conversation(
            history=[decoder_pb2.Turn(user=t.user, assistant=t.assistant) for t in session.turns]
            if session else [],
            question=question,
        )
        if session and session.system_message is not None:
            conversation.system_message = session.system_message
        setup = decoder_pb2.GenerateSetup(
            conversation=conversation,
            sampling=request.generation,
            images=[
                decoder_pb2.ImageDescriptor(
                    num_tiles=f.entry.num_tiles, content_hash=f.key, tensor=f.entry.tensor_header()
                )
                for f in blocks
            ],
        )
        call = self.decoder.generate(setup, [f.entry for f in blocks], timeout=timeout, metadata=metadata)
        answer: list[str] = []
        session_id = session.session_id if session else ""
        try:
            async for resp in call:
                answer.append(resp.text)
                part = gateway_pb2.ChatStreamResponse(
                    text=resp.text, finish_reason=resp.finish_reason, usage=resp.usage, session_id=session_id
                )
                if resp.finish_reason != decoder_pb2.FINISH_REASON_UNSPECIFIED and session:
                    layout = gateway_pb2.IMAGE_LAYOUT_COMBINED if combined else gateway_pb2.IMAGE_LAYOUT_SEPARATE
                    turn = Turn(user=question, assistant="".join(answer), images=tuple(new_refs), image_layout=layout)
                    await self._store_turn(session_id, turn, new_files)
                yield part
        except grpc.aio.AioRpcError as err:
            raise _peer_error("language decoder", err) from err
        finally:
            call.cancel()  # no-op once finished; stops generation if our client went away

    # ------------------------------------------------------------------ features

    async def _image_features(self, request, info, timeout, metadata):
        tiling = self._tiling(request.tiling, info, default_max=info.default_max_tiles)
        images = [img.data for img in request.images]
        hashes = [content_hash(data) for data in images]
        keys = [self._image_key(h, tiling, info) for h in hashes]

        async def one(data: bytes, key: str) -> Feature:
            entry = await self._cached(key, lambda: self._encode_image(data, tiling, timeout, metadata))
            return Feature(key, entry)

        features = await asyncio.gather(*(one(d, k) for d, k in zip(images, keys, strict=True)))
        refs = [ImageRef(h, tiling.max_tiles, tiling.min_tiles, tiling.use_thumbnail, f.entry.num_tiles)
                for h, f in zip(hashes, features, strict=True)]
        return list(features), refs, dict(zip(hashes, images, strict=True))

    async def _video_features(self, request, info, timeout, metadata):
        v = request.video
        tiling = self._tiling(request.tiling, info, default_max=1)  # upstream samples frames at max_num=1
        sampling = VideoSampling(
            num_segments=v.num_segments or DEFAULT_VIDEO_SEGMENTS,
            start_seconds=v.start_seconds if v.HasField("start_seconds") else None,
            end_seconds=v.end_seconds if v.HasField("end_seconds") else None,
        )
        video_hash = content_hash(v.data)
        keys = [self._frame_key(video_hash, i, sampling, tiling, info) for i in range(sampling.num_segments)]
        entries = await self._video_entries(v.data, keys, sampling, tiling, timeout, metadata)
        features = [Feature(k, e) for k, e in zip(keys, entries, strict=True)]
        refs = [ImageRef(video_hash, tiling.max_tiles, tiling.min_tiles, tiling.use_thumbnail, e.num_tiles,
                         video=sampling, frame_index=i) for i, e in enumerate(entries)]
        return features, refs, {video_hash: v.data}

    async def _video_entries(self, data, keys, sampling, tiling, timeout, metadata) -> list[Entry]:
        """All frames' features: from the cache when every frame is there, else one encoder call."""
        encoded: dict[str, Entry] = {}

        async def encode_all() -> Entry:
            frames = await self._encode_video(data, sampling, tiling, timeout, metadata)
            if len(frames) != len(keys):
                raise RequestError(grpc.StatusCode.INTERNAL,
                                   f"encoder returned {len(frames)} frames, expected {len(keys)}")
            encoded.update(zip(keys, frames, strict=True))
            await asyncio.gather(*(self.cache.put(k, e) for k, e in zip(keys[1:], frames[1:], strict=True)))
            return frames[0]

        # Single-flight on the first frame's key covers the whole video.
        first, _ = await self._cached_pair(keys[0], encode_all)
        rest = []
        for key in keys[1:]:
            if key in encoded:
                rest.append(encoded[key])
            else:
                rest.append(await self._cached(key, lambda k=key: self._frame_from_video(
                    data, keys.index(k), sampling, tiling, timeout, metadata)))
        return [first, *rest]

    async def _history_features(self, session: Session, timeout, metadata) -> list[Feature]:
        """Features of every image block of earlier turns, re-encoded from stored bytes if evicted."""
        features: list[Feature] = []
        refs_needed = [ref for turn in session.turns for ref in turn.images]
        if not refs_needed:
            return features
        info = await self._call_peer("vision encoder", self.encoder.model_info(timeout))
        for turn in session.turns:
            turn_features = []
            for ref in turn.images:
                tiling = Tiling(ref.max_tiles, ref.min_tiles, ref.use_thumbnail)
                if ref.video is not None:
                    key = self._frame_key(ref.content_hash, ref.frame_index, ref.video, tiling, info)
                else:
                    key = self._image_key(ref.content_hash, tiling, info)
                entry = await self._cached(key, lambda r=ref, t=tiling: self._reencode(
                    session.session_id, r, t, timeout, metadata))
                turn_features.append(Feature(key, entry))
            if turn.image_layout == gateway_pb2.IMAGE_LAYOUT_COMBINED and turn.images and turn.images[0].video is None:
                turn_features = _combine(turn_features)
            features.extend(turn_features)
        return features

    async def _reencode(self, session_id: str, ref: ImageRef, tiling: Tiling, timeout, metadata) -> Entry:
        data = await self._sessions_call(self.sessions.get_image(session_id, ref.content_hash))
        if data is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"session {session_id}: an earlier image's features and bytes are both gone")
        if ref.video is not None:
            return await self._frame_from_video(data, ref.frame_index, ref.video, tiling, timeout, metadata)
        return await self._encode_image(data, tiling, timeout, metadata)

    async def _encode_image(self, data: bytes, tiling: Tiling, timeout, metadata) -> Entry:
        req = vision_pb2.EncodeRequest(images=vision_pb2.ImageList(images=[vision_pb2.ImageInput(data=data)]),
                                       tiling=tiling.proto())
        items = await self._call_peer("vision encoder", self.encoder.encode(req, timeout=timeout, metadata=metadata))
        return items[0][1]

    async def _encode_video(self, data: bytes, sampling: VideoSampling, tiling: Tiling, timeout, metadata):
        video = vision_pb2.VideoInput(data=data, num_segments=sampling.num_segments)
        if sampling.start_seconds is not None:
            video.start_seconds = sampling.start_seconds
        if sampling.end_seconds is not None:
            video.end_seconds = sampling.end_seconds
        req = vision_pb2.EncodeRequest(video=video, tiling=tiling.proto())
        items = await self._call_peer("vision encoder", self.encoder.encode(req, timeout=timeout, metadata=metadata))
        return [entry for _, entry in items]

    async def _frame_from_video(self, data, index, sampling, tiling, timeout, metadata) -> Entry:
        return (await self._encode_video(data, sampling, tiling, timeout, metadata))[index]

    async def _cached(self, key: str, compute: Callable[[], Awaitable[Entry]]) -> Entry:
        return (await self._cached_pair(key, compute))[0]

    async def _cached_pair(self, key: str, compute: Callable[[], Awaitable[Entry]]) -> tuple[Entry, bool]:
        return await self.cache.get_or_compute(key, compute)

    # ------------------------------------------------------------------ helpers

    def _image_key(self, image_hash: str, tiling: Tiling, info) -> str:
        return feature_key_for_hash(
            image_hash, max_tiles=tiling.max_tiles, min_tiles=tiling.min_tiles,
            use_thumbnail=tiling.use_thumbnail, image_size=info.image_size, model_fingerprint=info.fingerprint,
        )

    def _frame_key(self, video_hash: str, index: int, sampling: VideoSampling, tiling: Tiling, info) -> str:
        return video_frame_key_for_hash(
            video_hash, frame_index=index, num_segments=sampling.num_segments,
            start_seconds=sampling.start_seconds, end_seconds=sampling.end_seconds,
            max_tiles=tiling.max_tiles, min_tiles=tiling.min_tiles, use_thumbnail=tiling.use_thumbnail,
            image_size=info.image_size, model_fingerprint=info.fingerprint,
        )

    def _tiling(self, options: vision_pb2.TilingOptions, info, default_max: int) -> Tiling:
        tiling = Tiling(
            max_tiles=options.max_tiles or default_max,
            min_tiles=options.min_tiles or 1,
            use_thumbnail=options.use_thumbnail if options.HasField("use_thumbnail") else info.default_use_thumbnail,
        )
        if not 1 <= tiling.min_tiles <= tiling.max_tiles <= MAX_TILES_LIMIT:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"need 1 <= min_tiles <= max_tiles <= {MAX_TILES_LIMIT}, "
                               f"got min_tiles={tiling.min_tiles} max_tiles={tiling.max_tiles}")
        return tiling

    def _validate(self, request) -> None:
        cfg = self.config
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if not request.text.strip() and not request.images and not request.HasField("video"):
            raise RequestError(bad, "the request has no text, image or video")
        if len(request.text.encode()) > cfg.max_text_bytes:
            raise RequestError(bad, f"text is longer than {cfg.max_text_bytes} bytes")
        if request.images and request.HasField("video"):
            raise RequestError(bad, "send images or a video, not both")
        if len(request.images) > cfg.max_images_per_request:
            raise RequestError(bad, f"{len(request.images)} images; at most {cfg.max_images_per_request} per request")
        for i, img in enumerate(request.images):
            if not img.data:
                raise RequestError(bad, f"image {i} is empty")
            if len(img.data) > cfg.max_image_bytes:
                raise RequestError(bad, f"image {i} is {len(img.data)} bytes; the limit is {cfg.max_image_bytes}")
        if request.HasField("video"):
            v = request.video
            if not v.data:
                raise RequestError(bad, "the video is empty")
            if len(v.data) > cfg.max_video_bytes:
                raise RequestError(bad, f"the video is {len(v.data)} bytes; the limit is {cfg.max_video_bytes}")
            if not 0 <= v.num_segments <= 64:
                raise RequestError(bad, f"num_segments must be in 1..64 (0 = {DEFAULT_VIDEO_SEGMENTS}), "
                                        f"got {v.num_segments}")
        problem = _sampling_problem(request.generation, self.config.max_new_tokens)
        if problem:
            raise RequestError(bad, problem)

    def _timeout(self, context) -> float:
        remaining = context.time_remaining()
        return self.config.default_timeout_s if remaining is None else max(remaining, 0.001)

    async def _require_session(self, session_id: str) -> Session:
        session = await self._sessions_call(self.sessions.get(session_id))
        if session is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"session {session_id!r} not found (expired or deleted)")
        return session

    async def _store_turn(self, session_id: str, turn: Turn, files: dict[str, bytes]) -> None:
        stored = await self._sessions_call(self.sessions.get_images(session_id, list(files)))
        await self._sessions_call(
            self.sessions.append_turn(session_id, turn, {h: d for h, d in files.items() if h not in stored})
        )

    async def _sessions_call(self, awaitable):
        try:
            return await awaitable
        except SessionError as exc:
            raise RequestError(*_session_status(exc)) from exc

    async def _call_peer(self, peer: str, awaitable):
        try:
            return await awaitable
        except grpc.aio.AioRpcError as err:
            raise _peer_error(peer, err) from err
        except PeerProtocolError as exc:
            raise RequestError(grpc.StatusCode.INTERNAL, f"{peer}: {exc}") from exc


def _combine(features: list[Feature]) -> list[Feature]:
    """All images' tiles as one block (upstream num_patches_list=None)."""
    if len(features) <= 1:
        return features
    first = features[0].entry
    payload = b"".join(bytes(f.entry.payload) for f in features)
    shape = (sum(f.entry.num_tiles for f in features), *first.shape[1:])
    key = content_hash("|".join(f.key for f in features).encode())
    return [Feature(key, Entry(first.dtype, shape, payload))]


def _sampling_problem(p, max_new_tokens: int) -> str | None:
    """The decoder checks these too; checked here as well so a doomed request encodes no image.
    `max_new_tokens` is the gateway's own cap: the longest generation its drain is sized for."""
    for name in ("temperature", "top_p", "repetition_penalty"):
        if p.HasField(name) and not math.isfinite(getattr(p, name)):
            return f"generation.{name} must be a finite number, got {getattr(p, name)}"
    if p.max_new_tokens < 0:
        return f"generation.max_new_tokens must be >= 0 (0 = the server default), got {p.max_new_tokens}"
    if p.max_new_tokens > max_new_tokens:
        return (f"generation.max_new_tokens must be <= {max_new_tokens} (this gateway's --max-new-tokens), "
                f"got {p.max_new_tokens}")
    if p.HasField("temperature") and p.temperature < 0:
        return f"generation.temperature must be >= 0 (0 = greedy), got {p.temperature}"
    if p.HasField("top_p") and not 0 < p.top_p <= 1:
        return f"generation.top_p must be in (0, 1], got {p.top_p}"
    if p.HasField("top_k") and p.top_k < 0:
        return f"generation.top_k must be >= 0 (0 = off), got {p.top_k}"
    if p.HasField("repetition_penalty") and p.repetition_penalty <= 0:
        return f"generation.repetition_penalty must be > 0 (1 = off), got {p.repetition_penalty}"
    return None


def _peer_error(peer: str, err: grpc.aio.AioRpcError) -> RequestError:
    code = err.code()
    if code in PEER_CODES_PASSED_THROUGH:
        # Keep the peer's retry hint: the client, not the gateway, decides when to come back.
        hint = tuple((k, v) for k, v in (err.trailing_metadata() or ()) if k == RETRY_AFTER_KEY)
        return RequestError(code, f"{peer}: {err.details()}", hint)
    return RequestError(grpc.StatusCode.INTERNAL, f"{peer} failed: {code.name}: {err.details()}")


def _session_status(exc: SessionError) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, SessionNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, SessionTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, SessionStoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"session store unavailable: {exc}"
    return grpc.StatusCode.INTERNAL, f"session store error: {exc}"


def _session_proto(session: Session) -> gateway_pb2.Session:
    return gateway_pb2.Session(
        session_id=session.session_id,
        system_message=session.system_message or "",
        turns=[gateway_pb2.SessionTurn(user=t.user, assistant=t.assistant, image_hashes=list(t.image_hashes))
               for t in session.turns],
        expires_at_unix=int(session.expires_at),
    )


def _forwarded_metadata(context) -> list[tuple[str, str]]:
    """Propagate the request id to the peers so logs of one request can be joined."""
    return [(k, v) for k, v in (context.invocation_metadata() or ()) if k == "x-request-id"]
