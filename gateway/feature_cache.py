"""Content-addressed cache of image embeddings in Redis, shared by every gateway replica.

One InternVL2-8B image at 13 tiles is ~26 MiB of bf16 embeddings and costs a full InternViT pass,
so the same image (a retry, a later turn, another user) should be encoded once. Keys hash the
image bytes together with everything that changes the result (tiling settings, model fingerprint);
values (gateway/feature_values.py) are a Redis list: a checksummed header, then the encoder's chunk
messages as they came, so a hit goes to the decoder without a copy. No torch here.

Values are tens of MiB: a synchronous client (`bulk_client`) moves them in a worker thread, where
redis-py sends each list element with `sendall` (no join) and the event loop never waits on the copy.

The cache is an optimisation, never a dependency: any Redis failure (down, slow, full, a corrupt
value) is logged and counted, and the request goes on by computing the features. It has a Redis of
its own (LRU, nothing persisted), apart from the sessions, and works on a Redis Cluster: every call
touches one key (a value, or its lock), so keys spread over all slots.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Re-exported: callers build clients and entries through this module.
from gateway.feature_values import HEADER_FIXED_BYTES as HEADER_FIXED_BYTES
from gateway.feature_values import Entry as Entry
from gateway.feature_values import EntryFormatError as EntryFormatError
from gateway.feature_values import decode_entry as decode_entry
from gateway.feature_values import encode_entry as encode_entry
from gateway.feature_values import entry_from_values, entry_to_values
from gateway.redis_connect import redis_client as redis_client
from gateway.redis_connect import sync_redis_client as sync_redis_client

log = logging.getLogger(__name__)

# Bump the version whenever the key derivation changes: old entries then simply stop being found and
# age out through their TTL. Value layouts are versioned inside the value (gateway/feature_values.py).
KEY_PREFIX = "ivl:feat:v1:"
LOCK_SUFFIX = ":lock"
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ----------------------------------------------------------------------------------------------
# Keys


def file_sha256(data: bytes | bytearray | memoryview) -> str:
    """sha256 hex of raw input bytes: the identity of an image (or video) file everywhere."""
    return hashlib.sha256(data).hexdigest()


def _check_settings(
    max_tiles: int, min_tiles: int, use_thumbnail: bool, image_size: int, fingerprint: str
) -> None:
    # Callers must resolve defaults first (proto 0 / unset -> the model's values): keying on the
    # unresolved "0" would make the default and its explicit spelling two different entries.
    if not fingerprint:
        raise ValueError("model_fingerprint is required: it keeps different models' features apart")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min={min_tiles} max={max_tiles}")
    if not isinstance(use_thumbnail, bool):
        raise ValueError(f"use_thumbnail must be a resolved bool, got {use_thumbnail!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")


def _derive_key(fields: dict[str, Any], scope: str = "") -> str:
    # A scope (a tenant's, see ChatCore.cache_scope) gives its own key space; none keeps the shared keys.
    if scope:
        fields = {**fields, "scope": scope}
    # Canonical JSON (sorted keys, escaped strings) is unambiguous, unlike joining with separators.
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return KEY_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


def _check_hash(value: str, what: str) -> None:
    if not _HEX64.fullmatch(value):
        raise ValueError(f"{what} must be a sha256 hex digest, got {value!r}")


def feature_key_for_hash(
    image_hash: str, *, max_tiles: int, min_tiles: int, use_thumbnail: bool, image_size: int,
    model_fingerprint: str, scope: str = "",
) -> str:
    """Key of an image's features from its content hash (sessions keep hashes, not always bytes);
    `scope` (a tenant's) keeps one scope's entries invisible to another."""
    _check_hash(image_hash, "image_hash")
    _check_settings(max_tiles, min_tiles, use_thumbnail, image_size, model_fingerprint)
    return _derive_key({
        "kind": "image", "content": image_hash, "max_tiles": max_tiles, "min_tiles": min_tiles,
        "use_thumbnail": use_thumbnail, "image_size": image_size, "model": model_fingerprint,
    }, scope)


def feature_key(
    image_bytes: bytes | bytearray | memoryview, *, max_tiles: int, min_tiles: int, use_thumbnail: bool,
    image_size: int, model_fingerprint: str,
) -> str:
    """`ivl:feat:v1:<sha256>` over the image bytes, its preprocessing settings and the model."""
    return feature_key_for_hash(
        file_sha256(image_bytes), max_tiles=max_tiles, min_tiles=min_tiles, use_thumbnail=use_thumbnail,
        image_size=image_size, model_fingerprint=model_fingerprint,
    )


def video_frame_key_for_hash(
    video_hash: str, *, frame_index: int, num_segments: int, start_seconds: float | None,
    end_seconds: float | None, max_tiles: int, min_tiles: int, use_thumbnail: bool, image_size: int,
    model_fingerprint: str, scope: str = "",
) -> str:
    """Key of the `frame_index`-th sampled frame of a video (hash the video once for all frames).

    The key must be known before the encoder runs, so it names the frame by its position among the
    sampled frames, which the video bytes and the sampling settings determine.
    """
    _check_hash(video_hash, "video_hash")
    _check_settings(max_tiles, min_tiles, use_thumbnail, image_size, model_fingerprint)
    if num_segments < 1 or not 0 <= frame_index < num_segments:
        raise ValueError(f"need 0 <= frame_index < num_segments, got {frame_index} of {num_segments}")
    return _derive_key({
        "kind": "video_frame", "content": video_hash, "frame_index": frame_index,
        "num_segments": num_segments, "start_seconds": start_seconds, "end_seconds": end_seconds,
        "max_tiles": max_tiles, "min_tiles": min_tiles, "use_thumbnail": use_thumbnail,
        "image_size": image_size, "model": model_fingerprint,
    }, scope)


def video_frame_key(
    video_bytes: bytes | bytearray | memoryview, *, frame_index: int, num_segments: int,
    start_seconds: float | None, end_seconds: float | None, max_tiles: int, min_tiles: int,
    use_thumbnail: bool, image_size: int, model_fingerprint: str,
) -> str:
    """`video_frame_key_for_hash` over the video's bytes (prefer hashing once for all frames)."""
    return video_frame_key_for_hash(
        file_sha256(video_bytes), frame_index=frame_index, num_segments=num_segments,
        start_seconds=start_seconds, end_seconds=end_seconds, max_tiles=max_tiles, min_tiles=min_tiles,
        use_thumbnail=use_thumbnail, image_size=image_size, model_fingerprint=model_fingerprint,
    )


# ----------------------------------------------------------------------------------------------
# The cache


@dataclass(frozen=True)
class FeatureCacheConfig:
    ttl_s: float = 3600.0  # features are re-creatable; the TTL lets cold images leave Redis
    # 13 tiles x 2 MiB (8B, bf16) = 26 MiB; room for fp32, refusing only pathological values.
    max_entry_bytes: int = 64 << 20
    op_timeout_s: float = 2.0  # bound on any one Redis call, whatever the client is configured to do
    retry_after_s: float = 1.0  # after a connection failure, skip Redis this long (0 = always try)
    # Single-flight across replicas: a short `SET NX PX` lock; the others poll for the value.
    cross_replica_lock: bool = True
    lock_ttl_s: float = 30.0  # outlives a slow encode; a crashed holder's lock just expires
    lock_wait_s: float = 5.0  # then compute anyway: a stuck replica must not stall this one
    lock_poll_s: float = 0.02
    # Threads (each with its own connection) moving values for a bulk client: their own pool, so that a
    # burst of cache traffic neither waits behind other work in asyncio's default executor nor takes it.
    bulk_threads: int = 8

    def __post_init__(self) -> None:
        for name in ("ttl_s", "op_timeout_s", "lock_ttl_s", "lock_poll_s", "bulk_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FeatureCacheConfig.{name} must be positive")
        if self.max_entry_bytes <= 0 or self.retry_after_s < 0 or self.lock_wait_s < 0:
            raise ValueError("FeatureCacheConfig: max_entry_bytes > 0, retry_after_s >= 0, lock_wait_s >= 0")


@dataclass
class CacheStats:
    """Plain counters (Prometheus reads them later). Per lookup: exactly one of hits / misses."""

    hits: int = 0
    misses: int = 0
    errors: int = 0  # failed Redis calls: down, timeout, OOM, ...
    bypassed: int = 0  # Redis calls skipped while it was marked unavailable
    corrupt: int = 0  # values that failed verification (deleted, served as misses)
    oversize: int = 0  # entries not cached for exceeding max_entry_bytes
    computes: int = 0
    coalesced: int = 0  # callers that joined an identical in-flight lookup in this process
    abandoned: int = 0  # lookups (and their encodes) cancelled because every caller had left
    lock_waits: int = 0  # lookups that waited on another replica's compute
    bytes_read: int = 0
    bytes_written: int = 0


_FAILED: Any = object()  # sentinel: the Redis call failed and was already logged and counted

# Checksumming/copying tens of MiB takes milliseconds; xxh3 and socket I/O release the GIL, so bigger
# values go through a worker thread and the event loop keeps serving other requests.
_OFFLOAD_BYTES = 1 << 20


def _is_wrong_type(error: ResponseError) -> bool:
    return str(error).startswith("WRONGTYPE")


def _value_bytes(value: list[bytes] | bytes) -> int:
    return sum(map(len, value)) if isinstance(value, list) else len(value)


def _decode_value(value: list[bytes] | bytes) -> tuple[Entry, int]:
    """A v2 list, or a v1 string written by an earlier gateway."""
    entry = entry_from_values(value) if isinstance(value, list) else decode_entry(value)
    return entry, _value_bytes(value)


def _read_value(client: redis.Redis, key: str) -> tuple[Entry, int] | None:
    """Read and verify `key` with a synchronous client (in a worker thread)."""
    try:
        value = client.lrange(key, 0, -1)
    except ResponseError as e:
        if not _is_wrong_type(e):
            raise
        value = client.get(key)  # a v1 string
    return _decode_value(value) if value else None


def _queue_write(pipe: Any, key: str, values: list[bytes], ttl_ms: int) -> None:
    # Not MULTI (Redis Cluster clients of every supported redis-py version pipeline it, and a full Redis
    # refuses a whole transaction): two replicas writing one key at once can leave a doubled list, which
    # the header's frame count and checksum turn into one miss, never wrong bytes. One RPUSH carries the
    # whole value, so a reader never sees half of one writer's list.
    pipe.delete(key)
    pipe.rpush(key, *values)
    pipe.pexpire(key, ttl_ms)


def _write_value(client: redis.Redis, key: str, entry: Entry, ttl_ms: int) -> int:
    """Write `entry` with a synchronous client (in a worker thread); the bytes written."""
    values = entry_to_values(entry)
    with client.pipeline(transaction=False) as pipe:
        _queue_write(pipe, key, values, ttl_ms)
        pipe.execute()
    return _value_bytes(values)

_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Compute = Callable[[], Awaitable[Entry]]


class FeatureCache:
    """Embeddings by key in Redis, with single-flight computation of misses.

    `client` must return bytes (decode_responses=False); `redis_client()` builds a suitable one.
    `bulk_client`, a synchronous client of the same Redis (`sync_redis_client()`), moves the values in a
    worker thread; without one, `client` moves them on the event loop (measured slower: bench/transfer.py).
    """

    def __init__(self, client: aioredis.Redis, config: FeatureCacheConfig | None = None, *,
                 bulk_client: redis.Redis | None = None):
        self._redis = client
        self.config = config or FeatureCacheConfig()
        self._bulk = bulk_client
        self._bulk_pool = (ThreadPoolExecutor(self.config.bulk_threads, thread_name_prefix="feature-cache")
                           if bulk_client is not None else None)
        self.stats = CacheStats()
        self._inflight: dict[str, asyncio.Future[tuple[Entry, bool]]] = {}
        self._waiters: dict[asyncio.Future[tuple[Entry, bool]], int] = {}  # callers awaiting each in-flight task
        self._unavailable_until = 0.0
        self._unlock_script = client.register_script(_UNLOCK_LUA)

    async def _call(self, op: str, key: str, make_call: Callable[[], Awaitable[Any]]) -> Any:
        """One Redis call that cannot fail the request: errors are logged, counted, and give _FAILED."""
        if time.monotonic() < self._unavailable_until:
            self.stats.bypassed += 1
            return _FAILED
        try:
            return await asyncio.wait_for(make_call(), self.config.op_timeout_s)
        except (RedisConnectionError, RedisTimeoutError, asyncio.TimeoutError, OSError) as e:
            # Unreachable or hanging: stop paying a timeout per request for a while.
            self.stats.errors += 1
            self._unavailable_until = time.monotonic() + self.config.retry_after_s
            log.warning("feature cache: Redis %s %s failed (%s: %s); bypassing the cache for %.1fs",
                        op, key, type(e).__name__, e, self.config.retry_after_s)
        except RedisError as e:  # reachable but refused (OOM when full, ...): only this call fails
            self.stats.errors += 1
            log.warning("feature cache: Redis %s %s refused (%s: %s)", op, key, type(e).__name__, e)
        return _FAILED

    async def _fetch(self, key: str) -> Entry | None:
        try:
            got = await self._call("LRANGE", key, lambda: self._read(key))
        except EntryFormatError as e:
            # Worst case this races a fresh write from another replica and deletes it: one extra miss.
            self.stats.corrupt += 1
            log.warning("feature cache: dropping corrupt entry %s: %s", key, e)
            await self._call("DEL", key, lambda: self._redis.delete(key))
            return None
        if got is _FAILED or got is None:
            return None
        entry, nbytes = got
        self.stats.bytes_read += nbytes
        return entry

    def close(self) -> None:
        """Stop the bulk threads (the clients are the caller's to close)."""
        if self._bulk_pool is not None:
            self._bulk_pool.shutdown(wait=False, cancel_futures=True)

    def _in_bulk_thread(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.get_running_loop().run_in_executor(self._bulk_pool, fn, *args)

    async def _read(self, key: str) -> tuple[Entry, int] | None:
        """(entry, bytes read) or None when absent; EntryFormatError for a damaged value."""
        if self._bulk is not None:
            return await self._in_bulk_thread(_read_value, self._bulk, key)
        try:
            value = await self._redis.lrange(key, 0, -1)
        except ResponseError as e:
            if not _is_wrong_type(e):
                raise
            value = await self._redis.get(key)  # a v1 string
        if not value:
            return None
        if _value_bytes(value) >= _OFFLOAD_BYTES:
            return await asyncio.to_thread(_decode_value, value)
        return _decode_value(value)

    async def get(self, key: str) -> Entry | None:
        entry = await self._fetch(key)
        if entry is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return entry

    async def put(self, key: str, entry: Entry, ttl_s: float | None = None) -> bool:
        """Store `entry`; False (logged, counted) when it is too big or Redis refuses/fails."""
        if entry.encoded_size > self.config.max_entry_bytes:
            self.stats.oversize += 1
            log.info("feature cache: not caching %s: %d bytes > max_entry_bytes %d",
                     key, entry.encoded_size, self.config.max_entry_bytes)
            return False
        ttl_ms = max(1, math.ceil((self.config.ttl_s if ttl_s is None else ttl_s) * 1000))
        if self._bulk is not None:
            written = await self._call("RPUSH", key, lambda: self._in_bulk_thread(
                _write_value, self._bulk, key, entry, ttl_ms))
        else:
            written = await self._call("RPUSH", key, lambda: self._write_async(key, entry, ttl_ms))
        if written is _FAILED:
            return False
        self.stats.bytes_written += written
        return True

    async def _write_async(self, key: str, entry: Entry, ttl_ms: int) -> int:
        if entry.nbytes >= _OFFLOAD_BYTES:
            values = await asyncio.to_thread(entry_to_values, entry)
        else:
            values = entry_to_values(entry)
        async with self._redis.pipeline(transaction=False) as pipe:
            _queue_write(pipe, key, values, ttl_ms)
            await pipe.execute()
        return _value_bytes(values)

    async def get_or_compute(self, key: str, compute: Compute) -> tuple[Entry, bool]:
        """The cached entry (hit=True), or `compute()`'s, stored for next time (hit=False).

        Concurrent callers for one key share one lookup and one compute, and all get its result
        or its exception. The shared work is shielded from any one caller's cancellation (a client
        hanging up must not fail the others); once every caller has left, it is cancelled: nobody
        is left to pay for (an encode nobody waits for only delays everyone else's).
        """
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._lookup_or_compute(key, compute))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._release_slot, key))
        else:
            self.stats.coalesced += 1
        self._waiters[task] = self._waiters.get(task, 0) + 1
        try:
            return await asyncio.shield(task)
        finally:
            self._waiters[task] -= 1
            if not self._waiters[task]:
                del self._waiters[task]
                if not task.done():
                    self.stats.abandoned += 1
                    task.cancel()

    def _release_slot(self, key: str, task: asyncio.Future[tuple[Entry, bool]]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: when every caller has left, nobody else reads it

    async def _lookup_or_compute(self, key: str, compute: Compute) -> tuple[Entry, bool]:
        entry = await self._fetch(key)
        token = None
        if entry is None and self.config.cross_replica_lock:
            token, entry = await self._lock_or_wait(key)
        if entry is not None:
            self.stats.hits += 1
            return entry, True
        self.stats.misses += 1
        try:
            self.stats.computes += 1
            entry = await compute()
            if not isinstance(entry, Entry):
                raise TypeError(f"compute() must return an Entry, got {type(entry).__name__}")
            await self.put(key, entry)
            return entry, False
        finally:
            if token is not None:
                await self._unlock(key + LOCK_SUFFIX, token)

    async def _unlock(self, lock_key: str, token: str) -> None:
        # Delete only our own lock: if ours expired and another replica took it, leave theirs alone.
        await self._call("unlock", lock_key, lambda: self._unlock_script(keys=[lock_key], args=[token]))

    async def _lock_or_wait(self, key: str) -> tuple[str | None, Entry | None]:
        """Take the cross-replica compute lock for `key`, or wait (bounded) for the replica that has it.

        Returns (token, None) when this replica holds the lock and should compute; (None, entry) when
        another replica filled the key meanwhile; (None, None) to compute without the lock (Redis is
        failing, the wait timed out).
        """
        lock_key = key + LOCK_SUFFIX
        token = secrets.token_hex(16)
        lock_ms = math.ceil(self.config.lock_ttl_s * 1000)
        deadline = time.monotonic() + self.config.lock_wait_s
        waited = False
        while True:
            got = await self._call("SET NX", lock_key,
                                   lambda: self._redis.set(lock_key, token, nx=True, px=lock_ms))
            if got is _FAILED:
                return None, None
            if got and not waited:
                return token, None
            if got:
                # The previous holder finished (or gave up) between two polls: it may have stored it.
                exists = await self._call("EXISTS", key, lambda: self._redis.exists(key))
                entry = await self._fetch(key) if exists and exists is not _FAILED else None
                if entry is None:
                    return token, None
                await self._unlock(lock_key, token)
                return None, entry
            if not waited:
                waited = True
                self.stats.lock_waits += 1
            if time.monotonic() >= deadline:
                log.warning("feature cache: waited %.1fs on another replica's compute of %s; computing here",
                            self.config.lock_wait_s, key)
                return None, None
            await asyncio.sleep(self.config.lock_poll_s)
            exists = await self._call("EXISTS", key, lambda: self._redis.exists(key))
            if exists is _FAILED:
                return None, None
            if exists:
                entry = await self._fetch(key)
                if entry is not None:
                    return None, entry
