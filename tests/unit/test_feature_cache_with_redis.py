"""Unit tier: FeatureCache's own logic against a real redis-server: TTLs, single-flight, corruption and
Redis failures.

The encoder is not involved: `get_or_compute` takes any `compute()`, and a scripted one here counts its
calls and, when gated, waits until the test releases it, so concurrency is arranged by events rather
than by timing. The real gateway and encoder processes sharing the cache are tested in
tests/integration/test_gateway_cache.py (encoder calls counted through their metrics).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest

from gateway.feature_cache import (
    LOCK_SUFFIX,
    Entry,
    FeatureCache,
    FeatureCacheConfig,
    encode_entry,
    feature_key,
    redis_client,
)
from gateway.feature_values import entry_to_values
from internvl.v1 import tensor_pb2

# Short timeouts so fault tests finish quickly; production defaults are longer.
FAST = FeatureCacheConfig(op_timeout_s=0.5, retry_after_s=0.05, lock_wait_s=3.0, lock_poll_s=0.01)
SETTINGS = dict(max_tiles=12, min_tiles=1, use_thumbnail=True, image_size=448, model_fingerprint="test-model")


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def make_entry(tiles: int = 2, tokens: int = 16, hidden: int = 32) -> Entry:
    return Entry(tensor_pb2.DTYPE_BFLOAT16, (tiles, tokens, hidden), os.urandom(tiles * tokens * hidden * 2))


def new_key() -> str:
    return feature_key(os.urandom(32), **SETTINGS)


@asynccontextmanager
async def open_cache(url: str, config: FeatureCacheConfig = FAST) -> AsyncIterator[FeatureCache]:
    client = redis_client(url, timeout_s=0.5)
    try:
        yield FeatureCache(client, config)
    finally:
        await client.aclose()


class ScriptedCompute:
    """A compute() that counts its calls, answers `entry` or raises `error`, and with `gated=True`
    holds every call until `release()` (create it inside the test's event loop)."""

    def __init__(self, entry: Entry | None = None, error: Exception | None = None, gated: bool = False):
        self.entry = entry or make_entry()
        self.error, self.calls = error, 0
        self._gate = asyncio.Event()
        if not gated:
            self._gate.set()

    def release(self) -> None:
        self._gate.set()

    async def __call__(self) -> Entry:
        self.calls += 1
        await self._gate.wait()
        if self.error is not None:
            raise self.error
        return self.entry


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll `condition()` (letting the other tasks run) until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout_s}s"
        await asyncio.sleep(0.005)


async def expired(cache: FeatureCache, key: str, timeout_s: float = 10.0) -> None:
    """Poll Redis (not the cache, so its stats stay as they are) until `key` is gone."""
    deadline = time.monotonic() + timeout_s
    while await cache._redis.exists(key):
        assert time.monotonic() < deadline, f"{key} still in Redis after {timeout_s}s"
        await asyncio.sleep(0.02)


def test_put_get_and_ttl(redis_url):
    async def scenario():
        async with open_cache(redis_url) as cache:
            key, entry = new_key(), make_entry()
            assert await cache.get(key) is None
            assert await cache.put(key, entry, ttl_s=0.3)
            got = await cache.get(key)
            assert got == entry and bytes(got.payload) == bytes(entry.payload)
            assert 0 < await cache._redis.pttl(key) <= 300
            await expired(cache, key)
            assert await cache.get(key) is None
            assert await cache.put(key, entry)  # default TTL from the config
            assert 3_590_000 < await cache._redis.pttl(key) <= 3_600_000
            s = cache.stats
            assert (s.hits, s.misses, s.errors) == (1, 2, 0)
            size = sum(map(len, entry_to_values(entry)))  # the stored list: header + chunk frames
            assert (s.bytes_written, s.bytes_read) == (2 * size, size)

    run(scenario())


def test_real_size_entry_round_trips(redis_url):
    # One InternVL2-8B image at 12 tiles + thumbnail: 13 x 256 x 4096 bf16 = 26 MiB.
    async def scenario():
        async with open_cache(redis_url) as cache:
            key, entry = new_key(), make_entry(tiles=13, tokens=256, hidden=4096)
            assert entry.nbytes == 26 << 20
            assert await cache.put(key, entry)
            got, hit = await cache.get_or_compute(key, ScriptedCompute())
            assert hit and got.shape == (13, 256, 4096) and bytes(got.payload) == bytes(entry.payload)

    run(scenario())


def test_single_flight_20_concurrent_callers_share_one_compute(redis_url):
    async def scenario():
        async with open_cache(redis_url) as cache:
            key, compute = new_key(), ScriptedCompute(gated=True)
            callers = asyncio.gather(*(cache.get_or_compute(key, compute) for _ in range(20)))
            await until(lambda: compute.calls == 1 and cache.stats.coalesced == 19)  # all 20 are in
            compute.release()
            results = await callers
            assert compute.calls == 1
            assert {bytes(e.payload) for e, _ in results} == {bytes(compute.entry.payload)}
            assert all(not hit for _, hit in results)
            assert cache.stats.coalesced == 19 and cache.stats.computes == 1
            assert not cache._inflight  # the slot is cleared afterwards
            entry, hit = await cache.get_or_compute(key, compute)  # now served from Redis
            assert hit and compute.calls == 1 and entry == compute.entry

    run(scenario())


def test_single_flight_errors_reach_every_waiter_and_clear_the_slot(redis_url):
    async def scenario():
        async with open_cache(redis_url) as cache:
            key = new_key()
            failing = ScriptedCompute(error=RuntimeError("encoder down"), gated=True)
            callers = asyncio.gather(*(cache.get_or_compute(key, failing) for _ in range(5)), return_exceptions=True)
            await until(lambda: failing.calls == 1 and cache.stats.coalesced == 4)
            failing.release()
            results = await callers
            assert failing.calls == 1
            assert all(isinstance(r, RuntimeError) and str(r) == "encoder down" for r in results)
            assert not cache._inflight
            assert await cache._redis.get(key + LOCK_SUFFIX) is None  # the lock was released
            ok = ScriptedCompute()
            entry, hit = await cache.get_or_compute(key, ok)  # a later call tries again
            assert ok.calls == 1 and not hit and entry == ok.entry

    run(scenario())


def test_one_caller_cancelling_does_not_cancel_the_others(redis_url):
    async def scenario():
        async with open_cache(redis_url) as cache:
            key, compute = new_key(), ScriptedCompute(gated=True)
            quitter = asyncio.ensure_future(cache.get_or_compute(key, compute))
            stayer = asyncio.ensure_future(cache.get_or_compute(key, compute))
            await until(lambda: compute.calls == 1 and cache.stats.coalesced == 1)  # both wait on one compute
            quitter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await quitter
            compute.release()
            entry, _ = await stayer
            assert quitter.cancelled() and entry == compute.entry and compute.calls == 1
            assert await cache.get(key) == compute.entry  # the shared work still filled the cache

    run(scenario())


def test_single_flight_across_replicas(redis_url):
    async def scenario():
        async with open_cache(redis_url) as a, open_cache(redis_url) as b:
            key, compute = new_key(), ScriptedCompute(gated=True)
            callers = asyncio.gather(*(cache.get_or_compute(key, compute) for cache in (a, b) for _ in range(10)))
            # One replica computes under the Redis lock; the other polls it until the value appears.
            await until(lambda: compute.calls == 1 and a.stats.lock_waits + b.stats.lock_waits == 1)
            compute.release()
            results = await callers
            assert compute.calls == 1
            assert {bytes(e.payload) for e, _ in results} == {bytes(compute.entry.payload)}
            assert a.stats.lock_waits + b.stats.lock_waits == 1  # the replica that lost the lock waited
            assert sum(hit for _, hit in results) == 10  # ... and was served from Redis

    run(scenario())


def test_waiting_replica_computes_when_the_holder_gives_up(redis_url):
    async def scenario():
        patient = replace(FAST, lock_wait_s=60.0)  # far beyond the test: b must notice the release
        async with open_cache(redis_url, patient) as a, open_cache(redis_url, patient) as b:
            key = new_key()
            failing = ScriptedCompute(error=RuntimeError("boom"), gated=True)
            ok = ScriptedCompute()
            first = asyncio.ensure_future(a.get_or_compute(key, failing))
            await until(lambda: failing.calls == 1)  # a holds the lock and computes
            second = asyncio.ensure_future(b.get_or_compute(key, ok))
            await until(lambda: b.stats.lock_waits == 1)  # b waits on a's lock
            released = time.monotonic()
            failing.release()
            with pytest.raises(RuntimeError):
                await first
            entry, hit = await second
            assert not hit and entry == ok.entry and ok.calls == 1
            assert time.monotonic() - released < 10.0  # noticed the released lock, not the 60 s wait bound

    run(scenario())


def test_waiting_on_a_stuck_replica_is_bounded(redis_url):
    async def scenario():
        config = FeatureCacheConfig(op_timeout_s=0.5, lock_wait_s=0.2, lock_poll_s=0.01)
        async with open_cache(redis_url, config) as cache:
            key, compute = new_key(), ScriptedCompute()
            await cache._redis.set(key + LOCK_SUFFIX, b"someone-else", px=10_000)  # never released
            start = time.monotonic()
            entry, hit = await cache.get_or_compute(key, compute)
            assert 0.2 <= time.monotonic() - start < 1.0
            assert not hit and compute.calls == 1 and cache.stats.lock_waits == 1
            assert await cache._redis.get(key + LOCK_SUFFIX) == b"someone-else"  # not ours to delete

    run(scenario())


@pytest.mark.parametrize("damage", ["flip_payload_byte", "truncate", "garbage"])
def test_corrupted_entry_is_dropped_and_recomputed(redis_url, damage):
    async def scenario():
        async with open_cache(redis_url) as cache:
            key, compute = new_key(), ScriptedCompute()
            raw = bytearray(encode_entry(make_entry()))
            if damage == "flip_payload_byte":
                raw[-5] ^= 0xFF
            elif damage == "truncate":
                raw = raw[:-7]
            else:
                raw = bytearray(b"not an entry")
            await cache._redis.set(key, bytes(raw))
            entry, hit = await cache.get_or_compute(key, compute)
            assert not hit and compute.calls == 1 and entry == compute.entry
            assert cache.stats.corrupt == 1
            assert await cache.get(key) == compute.entry  # replaced by the recomputed value

    run(scenario())


def test_redis_killed_requests_are_served_by_computing(redis_server):
    async def scenario():
        # retry_after_s 0: every lookup tries Redis again rather than bypassing it for a while.
        async with open_cache(redis_server.url, replace(FAST, retry_after_s=0.0)) as cache:
            cached_key = new_key()
            assert await cache.put(cached_key, make_entry())
            redis_server.stop()
            compute = ScriptedCompute()
            for _ in range(3):
                entry, hit = await cache.get_or_compute(new_key(), compute)
                assert entry == compute.entry and not hit
            assert compute.calls == 3 and cache.stats.errors >= 3 and cache.stats.bypassed == 0
            assert await cache.get(cached_key) is None  # a plain get degrades to a miss too
            assert not await cache.put(new_key(), make_entry())

            redis_server.restart()  # same port, empty
            key = new_key()
            assert await cache.put(key, compute.entry)
            assert (await cache.get_or_compute(key, compute))[1]  # the cache works again

    run(scenario())


def test_hanging_redis_costs_at_most_the_op_timeout(redis_server):
    async def scenario():
        async with open_cache(redis_server.url) as cache:
            await cache._redis.ping()  # an open connection that will hang
            redis_server.pause()
            try:
                start = time.monotonic()
                entry, hit = await cache.get_or_compute(new_key(), ScriptedCompute())
                elapsed = time.monotonic() - start
            finally:
                redis_server.resume()
            assert not hit and cache.stats.errors >= 1
            # The GET times out, then Redis is bypassed (lock, SET) for retry_after_s.
            assert elapsed < FAST.op_timeout_s + 1.0

    run(scenario())


def test_full_redis_noeviction_put_fails_gracefully(start_redis: Callable[..., Any]):
    server = start_redis(maxmemory="2mb", maxmemory_policy="noeviction")

    async def scenario():
        async with open_cache(server.url) as cache:
            stored = []
            for _ in range(40):  # 256 KiB each: Redis is full well before 10 MiB
                key, entry = new_key(), make_entry(tiles=1, tokens=256, hidden=512)
                if not await cache.put(key, entry):
                    break
                stored.append((key, entry))
            else:
                pytest.fail("Redis with maxmemory 2mb never refused a write")
            assert stored, "the first entry should have fit"
            assert cache.stats.errors == 1
            compute = ScriptedCompute()
            entry, hit = await cache.get_or_compute(new_key(), compute)  # lock + SET refused: still served
            assert not hit and entry == compute.entry and compute.calls == 1
            key, entry = stored[0]
            assert await cache.get(key) == entry  # reads still work when full

    run(scenario())


def test_entries_over_max_bytes_are_not_cached(redis_url):
    async def scenario():
        config = FeatureCacheConfig(max_entry_bytes=1024)
        async with open_cache(redis_url, config) as cache:
            key, compute = new_key(), ScriptedCompute(make_entry(tiles=1, tokens=16, hidden=64))  # 2 KiB
            entry, hit = await cache.get_or_compute(key, compute)
            assert entry == compute.entry and not hit
            assert cache.stats.oversize == 1 and cache.stats.errors == 0
            assert await cache._redis.exists(key) == 0

    run(scenario())
