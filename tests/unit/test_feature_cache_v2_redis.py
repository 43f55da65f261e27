"""FeatureCache's v2 values through a real redis-server: stored as a list of the received chunk frames,
read back ready to send; damaged entries are misses; entries an earlier gateway wrote (v1 strings) are
still read. Every scenario runs both ways the cache moves values: a synchronous client in a worker
thread (what the gateway runs) and the asyncio client on the event loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from gateway.feature_cache import (
    Entry,
    FeatureCache,
    FeatureCacheConfig,
    encode_entry,
    feature_key,
    redis_client,
    sync_redis_client,
)
from gateway.feature_values import entry_to_values
from internvl.v1 import tensor_pb2
from services.common.wire import Chunk, iter_chunks

BF16 = tensor_pb2.DTYPE_BFLOAT16
CONFIG = FeatureCacheConfig(op_timeout_s=5.0, retry_after_s=0.05, cross_replica_lock=False)
SETTINGS = dict(max_tiles=12, min_tiles=1, use_thumbnail=True, image_size=448, model_fingerprint="test-model")
MODES = ["bulk_thread", "asyncio"]


def received(tiles: int = 3, tokens: int = 16, hidden: int = 32, chunk_bytes: int = 1000) -> Entry:
    data = os.urandom(tiles * tokens * hidden * 2)
    return Entry(BF16, (tiles, tokens, hidden), [Chunk.wrap(p) for p in iter_chunks(data, chunk_bytes)])


def new_key() -> str:
    return feature_key(os.urandom(32), **SETTINGS)


@asynccontextmanager
async def open_cache(url: str, mode: str) -> AsyncIterator[FeatureCache]:
    client = redis_client(url, timeout_s=5.0)
    bulk = sync_redis_client(url, timeout_s=5.0) if mode == "bulk_thread" else None
    cache = FeatureCache(client, CONFIG, bulk_client=bulk)
    try:
        yield cache
    finally:
        cache.close()
        await client.aclose()
        if bulk is not None:
            bulk.close()


def run(scenario) -> None:
    asyncio.run(scenario())


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_stores_the_frames_as_a_list(redis_url, mode):
    async def scenario():
        async with open_cache(redis_url, mode) as cache:
            key, entry = new_key(), received()
            assert await cache.put(key, entry)
            stored = await cache._redis.lrange(key, 0, -1)
            assert stored[1:] == [p.frame for p in entry.pieces]  # the received messages, as they came
            assert 0 < await cache._redis.pttl(key) <= 3_600_000
            got = await cache.get(key)
            assert got == entry and got.shape == entry.shape
            assert all(isinstance(p, Chunk) for p in got.pieces)  # ready to relay: no join, no re-framing
            assert [bytes(f.frame) for f in got.frames()] == stored[1:]
            assert (cache.stats.hits, cache.stats.corrupt, cache.stats.errors) == (1, 0, 0)
            assert cache.stats.bytes_written == cache.stats.bytes_read == sum(map(len, stored))

    run(scenario)


@pytest.mark.parametrize("mode", MODES)
def test_a_rewrite_replaces_the_list(redis_url, mode):
    async def scenario():
        async with open_cache(redis_url, mode) as cache:
            key = new_key()
            assert await cache.put(key, received(chunk_bytes=500))
            second = received(chunk_bytes=700)
            assert await cache.put(key, second)
            assert await cache._redis.llen(key) == 1 + len(second.pieces)
            assert await cache.get(key) == second

    run(scenario)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damage", ["drop_last_frame", "truncate_a_frame", "flip_payload_byte", "double_push",
                                    "garbage_header"])
def test_a_damaged_list_is_a_miss_and_is_dropped(redis_url, mode, damage):
    async def scenario():
        async with open_cache(redis_url, mode) as cache:
            key, entry = new_key(), received()
            assert await cache.put(key, entry)
            r = cache._redis
            if damage == "drop_last_frame":
                await r.rpop(key)
            elif damage == "truncate_a_frame":
                await r.lset(key, 1, (await r.lindex(key, 1))[:-5])
            elif damage == "flip_payload_byte":
                frame = bytearray(await r.lindex(key, 2))
                frame[-1] ^= 0xFF
                await r.lset(key, 2, bytes(frame))
            elif damage == "double_push":  # two writers' RPUSHes after one DEL
                await r.rpush(key, *entry_to_values(entry))
            else:
                await r.lset(key, 0, b"not a header")
            assert await cache.get(key) is None
            assert cache.stats.corrupt == 1 and cache.stats.errors == 0
            assert not await r.exists(key)  # dropped, so the next put starts clean
            recomputed, hit = await cache.get_or_compute(key, _const(entry))
            assert not hit and await cache.get(key) == entry

    run(scenario)


def _const(entry: Entry):
    async def compute() -> Entry:
        return entry
    return compute


@pytest.mark.parametrize("mode", MODES)
def test_an_entry_an_earlier_gateway_wrote_is_read(redis_url, mode):
    async def scenario():
        async with open_cache(redis_url, mode) as cache:
            key, entry = new_key(), received()
            await cache._redis.set(key, encode_entry(entry), px=60_000)  # the v1 format: one string
            got = await cache.get(key)
            assert got == entry and cache.stats.hits == 1 and cache.stats.errors == 0
            # It goes to the decoder framed here (a v1 value has no frames to relay).
            assert b"".join(bytes(f.data) for f in got.frames(512)) == bytes(entry.payload)
            assert await cache._redis.type(key) == b"string"  # a hit: left as it is

    run(scenario)


@pytest.mark.parametrize("mode", MODES)
def test_a_damaged_old_entry_or_another_type_is_a_miss_not_an_error(redis_url, mode):
    async def scenario():
        async with open_cache(redis_url, mode) as cache:
            old = new_key()
            raw = bytearray(encode_entry(received()))
            raw[-1] ^= 1
            await cache._redis.set(old, bytes(raw))
            assert await cache.get(old) is None and cache.stats.corrupt == 1
            other = new_key()
            await cache._redis.hset(other, "field", "value")  # not ours at all: refused, not raised
            assert await cache.get(other) is None
            entry = received()
            assert await cache.put(other, entry)  # and the next put replaces it
            assert await cache.get(other) == entry

    run(scenario)


def test_a_real_size_image_round_trips_through_the_worker_thread(redis_url):
    # One InternVL2-8B image at 12 tiles + thumbnail: 13 x 256 x 4096 bf16 = 26 MiB in 2 MiB frames.
    async def scenario():
        async with open_cache(redis_url, "bulk_thread") as cache:
            key, entry = new_key(), received(13, 256, 4096, chunk_bytes=2 << 20)
            assert await cache.put(key, entry)
            assert await cache._redis.llen(key) == 1 + 13
            got = await cache.get(key)
            assert got.nbytes == 26 << 20 and got == entry

    run(scenario)


def test_the_event_loop_keeps_running_while_a_value_moves(redis_url):
    """The worker thread moves the bytes: other tasks keep being scheduled during a 26 MiB put and get."""
    async def scenario():
        async with open_cache(redis_url, "bulk_thread") as cache:
            key, entry = new_key(), received(13, 256, 4096, chunk_bytes=2 << 20)
            ticks = 0
            done = asyncio.Event()

            async def ticker():
                nonlocal ticks
                while not done.is_set():
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(ticker())
            try:
                assert await cache.put(key, entry)
                assert await cache.get(key) == entry
            finally:
                done.set()
                await task
            assert ticks > 10  # each put/get awaited a thread; the loop ran the ticker meanwhile

    run(scenario)
