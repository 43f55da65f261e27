"""Conversation history in Redis, so any gateway replica can serve a session's next turn.

Each turn keeps its user text exactly as upstream `chat()` keeps history (the '<image>'
placeholders included) and the decoded assistant text, because upstream rebuilds earlier turns by
re-tokenizing that text. Images are kept by reference (content hash + tiling settings) plus their
raw bytes under the session, so a later turn can re-encode them after the feature cache evicted
their embeddings.

Keys of one session share a hash tag, so Redis Cluster puts them on one slot and one Lua script
may touch them all:
  ivl:sess:v1:{<id>}:meta    HASH  v, created_at, ttl, image_bytes, owner, system_message (absent = default)
  ivl:sess:v1:{<id>}:turns   LIST  one JSON object per finished turn, oldest first
  ivl:sess:v1:{<id>}:images  HASH  content hash -> raw file bytes (images, or a video)
All three carry the session's TTL, refreshed on every read and append.

Sessions belong to a tenant (an API key's name): `owner` holds `owner_hash(tenant)`, never the name
itself, and a read or delete that names another owner finds nothing, exactly as for an unknown id.
Sessions stored before owners existed have no `owner` field: they count as the anonymous tenant's
(an --insecure-open gateway's), so after keys are turned on no key can read them; they expire by TTL.

The store is meant for a Redis of its own with `maxmemory-policy noeviction` and an append-only file
(deploy/k8s/redis/sessions.conf): full is then an error (SessionStoreFull), never a lost session.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, RedisError

from services.common.security import ANONYMOUS_TENANT

KEY_PREFIX = "ivl:sess:v1:"
TURN_FORMAT_VERSION = 1
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")  # what token_urlsafe makes; nothing that breaks a key
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HASH_OFFLOAD_BYTES = 1 << 20

T = TypeVar("T")


class SessionError(Exception):
    """Base of the errors the servicer maps to gRPC status codes."""


class SessionNotFound(SessionError):
    """Unknown, expired or deleted session (NOT_FOUND)."""


class SessionTooLarge(SessionError):
    """A turn, an image or the session's total would exceed a configured cap (RESOURCE_EXHAUSTED)."""


class SessionStoreUnavailable(SessionError):
    """Redis is down, timed out, or refused for another reason than memory (UNAVAILABLE)."""


class SessionStoreFull(SessionError):
    """Redis is at maxmemory and, evicting nothing, refused the write (RESOURCE_EXHAUSTED).

    Nothing stored is lost: the session store runs `noeviction`, so full means new writes fail
    while every session already there stays intact (reads and deletes keep working).
    """


class SessionCorrupted(SessionError):
    """Stored session data does not parse (DATA_LOSS)."""


@dataclass(frozen=True)
class SessionConfig:
    default_ttl_s: int = 3600  # of inactivity: every read or append restarts it
    max_ttl_s: int = 7 * 24 * 3600
    max_turns: int = 256
    max_text_bytes: int = 1 << 20  # per turn, user + assistant text in UTF-8
    max_image_bytes: int = 20 << 20  # per stored file
    max_session_image_bytes: int = 64 << 20  # all files of one session together
    op_timeout_s: float = 5.0  # an append may carry tens of MiB of image bytes

    def __post_init__(self) -> None:
        for name in ("default_ttl_s", "max_ttl_s", "max_turns", "max_text_bytes", "max_image_bytes",
                     "max_session_image_bytes", "op_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SessionConfig.{name} must be positive")
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError("SessionConfig.default_ttl_s exceeds max_ttl_s")


@dataclass(frozen=True)
class VideoSampling:
    """How frames were sampled from a stored video (upstream get_index settings)."""

    num_segments: int
    start_seconds: float | None = None
    end_seconds: float | None = None


@dataclass(frozen=True)
class ImageRef:
    """One image slot of a turn, described well enough to rebuild its features from stored bytes."""

    content_hash: str  # sha256 hex of the stored file (the image, or the video for a frame)
    max_tiles: int
    min_tiles: int
    use_thumbnail: bool
    num_tiles: int = 0  # tiles it produced, when known
    video: VideoSampling | None = None  # set for a sampled video frame
    frame_index: int = 0  # which sampled frame, when `video` is set

    def __post_init__(self) -> None:
        if not _HEX64.fullmatch(self.content_hash):
            raise ValueError(f"content_hash must be a sha256 hex digest, got {self.content_hash!r}")


@dataclass(frozen=True)
class Turn:
    user: str  # as upstream history stores it, '<image>' placeholders included
    assistant: str  # the decoded response text, re-tokenized when the next turn is rendered
    images: tuple[ImageRef, ...] = ()  # in placeholder order
    image_layout: int = 0  # gateway_pb2.ImageLayout: SEPARATE (one '<image>' each) or COMBINED
    created_at: float = field(default_factory=time.time)

    @property
    def image_hashes(self) -> tuple[str, ...]:
        return tuple(ref.content_hash for ref in self.images)


@dataclass(frozen=True)
class Session:
    session_id: str
    system_message: str | None  # None = the template's default system message
    turns: tuple[Turn, ...]
    ttl_s: int
    created_at: float
    expires_at: float  # unix seconds, as of this read
    image_bytes: int  # stored file bytes, counted against max_session_image_bytes


def owner_hash(tenant: str) -> str:
    """What a session stores of its tenant: a hash, so the store holds no key names."""
    return hashlib.sha256(f"ivl-session-owner:{tenant}".encode()).hexdigest()


# Sessions without an `owner` field (stored before owners existed) belong to the anonymous tenant.
LEGACY_OWNER = owner_hash(ANONYMOUS_TENANT)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


SESSION_ID_SHOWN = 6  # characters of a session id that messages and logs show: ids are bearer-like secrets


def session_prefix(session_id: str) -> str:
    """How messages and logs name a session: its first characters only (the id grants access to it)."""
    shown = "".join(c for c in session_id[:SESSION_ID_SHOWN] if c.isalnum() or c in "_-")
    return f"{shown}..." if len(session_id) > SESSION_ID_SHOWN else f"{shown!r}"


def new_session_id() -> str:
    """128 random bits: collisions are not a practical concern, so no existence check."""
    return secrets.token_urlsafe(16)


def _owned_by(stored: bytes | None, owner: str) -> bool:
    expected = LEGACY_OWNER.encode() if stored is None else bytes(stored)
    return hmac.compare_digest(expected, owner.encode())


def session_keys(session_id: str) -> list[str]:
    """[meta, turns, images] keys of a session (one hash tag: one Redis Cluster slot)."""
    base = f"{KEY_PREFIX}{{{session_id}}}"
    return [f"{base}:meta", f"{base}:turns", f"{base}:images"]


def _turn_to_json(turn: Turn) -> str:
    images = [
        {
            "hash": r.content_hash, "max_tiles": r.max_tiles, "min_tiles": r.min_tiles,
            "use_thumbnail": r.use_thumbnail, "num_tiles": r.num_tiles, "frame_index": r.frame_index,
            "video": None if r.video is None else {
                "num_segments": r.video.num_segments, "start_seconds": r.video.start_seconds,
                "end_seconds": r.video.end_seconds,
            },
        }
        for r in turn.images
    ]
    doc = {"v": TURN_FORMAT_VERSION, "user": turn.user, "assistant": turn.assistant, "images": images,
           "image_layout": turn.image_layout, "created_at": turn.created_at}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _turn_from_json(raw: bytes) -> Turn:
    try:
        doc = json.loads(raw)
        if doc.get("v") != TURN_FORMAT_VERSION:
            raise ValueError(f"unsupported turn version {doc.get('v')!r}")
        images = tuple(
            ImageRef(
                content_hash=i["hash"], max_tiles=i["max_tiles"], min_tiles=i["min_tiles"],
                use_thumbnail=i["use_thumbnail"], num_tiles=i["num_tiles"], frame_index=i["frame_index"],
                video=None if i["video"] is None else VideoSampling(**i["video"]),
            )
            for i in doc["images"]
        )
        return Turn(user=doc["user"], assistant=doc["assistant"], images=images,
                    image_layout=doc["image_layout"], created_at=doc["created_at"])
    except (ValueError, KeyError, TypeError) as e:
        raise SessionCorrupted(f"stored turn does not parse: {e}") from e


# Atomic append: the existence and size checks, the file writes, the push and the TTL refresh
# happen together, so concurrent appends (from any replica) are all kept and caps always hold.
# Idempotent: the client retries a call once when its connection drops, which may be after Redis
# ran it; the same turn (its JSON carries its creation time) is then found last and not pushed again.
# KEYS: meta, turns, images. ARGV: turn JSON, max_turns, max_session_image_bytes, n new files,
# then n (hash, bytes) pairs, then the hashes the turn references.
_APPEND_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
if redis.call('LINDEX', KEYS[2], -1) == ARGV[1] then return {redis.call('LLEN', KEYS[2]), ''} end
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[2]) then return {-2, ''} end
local n = tonumber(ARGV[4])
local provided, added = {}, 0
for i = 0, n - 1 do
  local h = ARGV[5 + 2 * i]
  if not provided[h] and redis.call('HEXISTS', KEYS[3], h) == 0 then
    added = added + string.len(ARGV[6 + 2 * i])
  end
  provided[h] = true
end
local used = tonumber(redis.call('HGET', KEYS[1], 'image_bytes') or '0')
if used + added > tonumber(ARGV[3]) then return {-3, tostring(used + added)} end
for i = 5 + 2 * n, #ARGV do
  if not provided[ARGV[i]] and redis.call('HEXISTS', KEYS[3], ARGV[i]) == 0 then return {-4, ARGV[i]} end
end
for i = 0, n - 1 do redis.call('HSETNX', KEYS[3], ARGV[5 + 2 * i], ARGV[6 + 2 * i]) end
if added > 0 then redis.call('HINCRBY', KEYS[1], 'image_bytes', added) end
local len = redis.call('RPUSH', KEYS[2], ARGV[1])
local ttl = redis.call('HGET', KEYS[1], 'ttl')
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
return {len, ''}
"""


# Create: the metadata and its TTL together (a Lua script, not MULTI: Redis Cluster runs it on the
# session's slot like any single-key command). KEYS: meta. ARGV: ttl, then field/value pairs.
_CREATE_LUA = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# How Redis words a write refused at maxmemory; inside a Lua script older servers wrap it in a
# generic script error, so the text is checked as well as the error class.
_OOM_TEXT = "OOM command not allowed"


def classify_error(what: str, error: BaseException) -> SessionError:
    """The typed error for a failed Redis call: full (nothing lost, retry later) or unavailable."""
    detail = f"{type(error).__name__}: {error}"
    if isinstance(error, OutOfMemoryError) or _OOM_TEXT in str(error):
        return SessionStoreFull(
            f"the session store is full (Redis maxmemory reached): {what} was refused and nothing was "
            f"stored; sessions already stored are intact. Retry later or delete sessions no longer needed; "
            f"operators: raise the session store's maxmemory or move it to a Redis Cluster ({detail})"
        )
    return SessionStoreUnavailable(f"session store: {what} failed ({detail})")


class SessionStore:
    """Sessions in Redis. `client` must return bytes (decode_responses=False), like the cache's."""

    def __init__(self, client: aioredis.Redis, config: SessionConfig | None = None):
        self._redis = client
        self.config = config or SessionConfig()
        self._append_script = client.register_script(_APPEND_LUA)
        self._create_script = client.register_script(_CREATE_LUA)

    async def _run(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(call, self.config.op_timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise classify_error(what, e) from e

    async def policy_problem(self) -> str | None:
        """What is wrong with the store's eviction policy (None: noeviction, or it cannot be read).

        A start-up check, never fatal: managed Redis services may hide INFO, and the store may be
        down for now (then calls fail with UNAVAILABLE until it is back).
        """
        try:
            info = await asyncio.wait_for(self._redis.info("memory"), self.config.op_timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError):
            return None
        nodes = info.values() if "maxmemory_policy" not in info else [info]  # a cluster answers per node
        policies = {str(node.get("maxmemory_policy")) for node in nodes if isinstance(node, dict)}
        bad = sorted(p for p in policies if p != "noeviction")
        if not bad:
            return None
        return (f"maxmemory-policy is {', '.join(bad)}: Redis may evict sessions when memory runs short. "
                f"Set maxmemory-policy noeviction (a full store then refuses new turns with RESOURCE_EXHAUSTED "
                f"and loses nothing)")

    def _resolve_ttl(self, ttl_s: int | None) -> int:
        if ttl_s is None or ttl_s == 0:
            return self.config.default_ttl_s
        if ttl_s < 0:
            raise ValueError(f"ttl must be positive, got {ttl_s}")
        return min(int(ttl_s), self.config.max_ttl_s)

    async def create(self, system_message: str | None = None, ttl_s: int | None = None,
                     owner: str = LEGACY_OWNER, session_id: str = "") -> Session:
        """A new empty session of `owner` (an `owner_hash`); ttl_s None/0 = the default, capped at max_ttl_s.
        `session_id`: one from `new_session_id` (when the caller must know it first), else a new one."""
        ttl = self._resolve_ttl(ttl_s)
        session_id = session_id or new_session_id()
        if not _SESSION_ID.fullmatch(session_id):
            raise ValueError("a session id is what new_session_id() makes")
        meta_key = session_keys(session_id)[0]
        now = time.time()
        meta: dict[str, str | int | float] = {"v": 1, "created_at": now, "ttl": ttl, "image_bytes": 0,
                                              "owner": owner}
        if system_message is not None:
            meta["system_message"] = system_message
        fields = [part for item in meta.items() for part in item]
        await self._run("create", self._create_script(keys=[meta_key], args=[ttl, *fields]))
        return Session(session_id, system_message, (), ttl, now, now + ttl, 0)

    async def get(self, session_id: str, owner: str | None = None) -> Session | None:
        """The session (its TTL restarted), or None if unknown, expired, or (`owner` given) another's."""
        if not _SESSION_ID.fullmatch(session_id):
            return None
        meta_key, turns_key, images_key = session_keys(session_id)
        # Not MULTI: Redis refuses every queued command of a transaction when it is full (maxmemory),
        # and reads should keep working then. An append landing in between is harmless.
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(meta_key)
        pipe.lrange(turns_key, 0, -1)
        raw_meta, raw_turns = await self._run("get", pipe.execute())
        if not raw_meta:
            return None
        meta = {k.decode(): v for k, v in raw_meta.items()}
        if owner is not None and not _owned_by(meta.get("owner"), owner):
            return None  # before the TTL refresh: another tenant's read is no activity
        try:
            ttl = int(meta["ttl"])
            created_at = float(meta["created_at"])
            image_bytes = int(meta["image_bytes"])
            system = meta["system_message"].decode() if "system_message" in meta else None
        except (KeyError, ValueError) as e:
            raise SessionCorrupted(f"session {session_prefix(session_id)} metadata does not parse: {e}") from e
        turns = tuple(_turn_from_json(raw) for raw in raw_turns)
        # A read is activity: restart the TTL. Not in a Lua script: EXPIRE is allowed when Redis is
        # full, a script that may write is not.
        pipe = self._redis.pipeline(transaction=False)
        for key in (meta_key, turns_key, images_key):
            pipe.expire(key, ttl)
        await self._run("refresh ttl", pipe.execute())
        return Session(session_id, system, turns, ttl, created_at, time.time() + ttl, image_bytes)

    async def append_turn(
        self, session_id: str, turn: Turn, images: Mapping[str, bytes] | None = None
    ) -> int:
        """Append a finished turn; returns the number of turns now stored.

        `images` maps content hash -> raw file bytes for files the session does not hold yet; every
        hash the turn references must be given here or already be stored with the session.
        """
        if not _SESSION_ID.fullmatch(session_id):
            raise SessionNotFound(f"session {session_prefix(session_id)} not found (expired or deleted)")
        images = dict(images or {})
        text_bytes = len(turn.user.encode()) + len(turn.assistant.encode())
        if text_bytes > self.config.max_text_bytes:
            limit = self.config.max_text_bytes
            raise SessionTooLarge(f"turn text is {text_bytes} bytes; the limit is {limit}")
        await self._check_images(images, set(turn.image_hashes))
        argv: list[str | bytes | int] = [_turn_to_json(turn), self.config.max_turns,
                                         self.config.max_session_image_bytes, len(images)]
        for content_hash, data in images.items():
            argv += [content_hash, data]
        argv += list(turn.image_hashes)
        keys = session_keys(session_id)
        code, detail = await self._run("append", self._append_script(keys=keys, args=argv))
        if code == -1:
            raise SessionNotFound(f"session {session_prefix(session_id)} not found (expired or deleted)")
        if code == -2:
            raise SessionTooLarge(
                f"session {session_prefix(session_id)} has the maximum of {self.config.max_turns} turns")
        if code == -3:
            raise SessionTooLarge(
                f"session {session_prefix(session_id)} would hold {int(detail)} bytes of images; "
                f"the limit is {self.config.max_session_image_bytes}"
            )
        if code == -4:
            raise ValueError(f"turn references image {detail.decode()} whose bytes the session does not hold")
        return int(code)

    async def _check_images(self, images: dict[str, bytes], referenced: set[str]) -> None:
        unreferenced = set(images) - referenced
        if unreferenced:
            raise ValueError(f"images not referenced by the turn: {sorted(unreferenced)}")
        for content_hash, data in images.items():
            if len(data) > self.config.max_image_bytes:
                raise SessionTooLarge(
                    f"image {content_hash[:12]}.. is {len(data)} bytes; "
                    f"the per-image limit is {self.config.max_image_bytes}"
                )
            # A wrong hash would silently give a later turn someone else's picture: verify.
            if len(data) >= _HASH_OFFLOAD_BYTES:  # hashlib releases the GIL: keep the loop serving
                actual = await asyncio.to_thread(_sha256_hex, data)
            else:
                actual = _sha256_hex(data)
            if actual != content_hash:
                raise ValueError(f"image bytes hash to {actual}, not to their key {content_hash}")

    async def get_images(self, session_id: str, content_hashes: list[str]) -> dict[str, bytes]:
        """Stored file bytes by content hash (absent ones are left out), to re-encode evicted features."""
        if not content_hashes or not _SESSION_ID.fullmatch(session_id):
            return {}
        values = await self._run("get_images", self._redis.hmget(session_keys(session_id)[2], content_hashes))
        return {h: v for h, v in zip(content_hashes, values, strict=True) if v is not None}

    async def get_image(self, session_id: str, content_hash: str) -> bytes | None:
        return (await self.get_images(session_id, [content_hash])).get(content_hash)

    async def delete(self, session_id: str, owner: str | None = None) -> bool:
        """Remove the session and its files; False if it did not exist (or, `owner` given, is another's)."""
        if not _SESSION_ID.fullmatch(session_id):
            return False
        if owner is not None:
            # An owner never changes, so checking before the DEL leaves no race that matters.
            stored = await self._run("delete", self._redis.hmget(session_keys(session_id)[0], ["v", "owner"]))
            if stored[0] is None or not _owned_by(stored[1], owner):
                return False
        # A plain DEL (no MULTI) also works when Redis is full, which is when freeing matters most.
        return bool(await self._run("delete", self._redis.delete(*session_keys(session_id))))

