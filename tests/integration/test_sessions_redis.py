"""SessionStore against a real redis-server: history, TTLs, concurrency, stored images, caps."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from gateway.feature_cache import redis_client
from gateway.sessions import (
    ImageRef,
    SessionConfig,
    SessionCorrupted,
    SessionNotFound,
    SessionStore,
    SessionStoreFull,
    SessionStoreUnavailable,
    SessionTooLarge,
    Turn,
    VideoSampling,
    session_keys,
)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@asynccontextmanager
async def open_store(url: str, config: SessionConfig | None = None) -> AsyncIterator[SessionStore]:
    client = redis_client(url, timeout_s=0.5)
    try:
        yield SessionStore(client, config)
    finally:
        await client.aclose()


def image(size: int = 1000) -> tuple[str, bytes]:
    data = os.urandom(size)
    return hashlib.sha256(data).hexdigest(), data


def ref(content_hash: str, **kw: Any) -> ImageRef:
    return ImageRef(content_hash, max_tiles=12, min_tiles=1, use_thumbnail=True, **kw)


def test_create_get_append_delete(redis_url):
    async def scenario():
        async with open_store(redis_url) as store:
            s = await store.create(system_message="Be brief.")
            assert len(s.session_id) >= 16 and s.turns == () and s.ttl_s == 3600
            got = await store.get(s.session_id)
            assert got is not None and got.system_message == "Be brief." and got.turns == ()

            h, data = image()
            video_hash, video = image(3000)
            t1 = Turn("<image>\nWhat is this?", "A cat.", (ref(h, num_tiles=7),))
            frames = tuple(ref(video_hash, num_tiles=1, video=VideoSampling(8, 0.5, None), frame_index=i)
                           for i in range(2))
            t2 = Turn("Frame1: <image>\nFrame2: <image>\nAnd these? ünïcødé", "Dogs.", frames)
            assert await store.append_turn(s.session_id, t1, {h: data}) == 1
            assert await store.append_turn(s.session_id, t2, {video_hash: video}) == 2
            got = await store.get(s.session_id)
            assert got.turns == (t1, t2)  # every field round-trips, '<image>' placeholders included
            assert got.turns[0].image_hashes == (h,)
            assert got.image_bytes == len(data) + len(video)

            assert await store.delete(s.session_id)
            assert await store.get(s.session_id) is None
            assert not await store.delete(s.session_id)
            assert await store.get_image(s.session_id, h) is None
            with pytest.raises(SessionNotFound):
                await store.append_turn(s.session_id, Turn("hi", "hello"))

    run(scenario())


def test_default_and_empty_system_message_differ(redis_url):
    async def scenario():
        async with open_store(redis_url) as store:
            default = await store.create()
            empty = await store.create(system_message="")
            assert (await store.get(default.session_id)).system_message is None
            assert (await store.get(empty.session_id)).system_message == ""

    run(scenario())


def test_unknown_and_malformed_ids(redis_url):
    async def scenario():
        async with open_store(redis_url) as store:
            assert await store.get("A" * 22) is None
            for bad in ("", "short", "x}:meta{" * 3, "a b" * 10):
                assert await store.get(bad) is None
                assert not await store.delete(bad)
                with pytest.raises(SessionNotFound):
                    await store.append_turn(bad, Turn("hi", "hello"))

    run(scenario())


def test_ttl_is_refreshed_on_use_and_sessions_expire(redis_url):
    async def scenario():
        async with open_store(redis_url) as store:
            s = await store.create(ttl_s=2)
            h, data = image()
            await store.append_turn(s.session_id, Turn("<image>\nhi", "hello", (ref(h),)), {h: data})
            for key in session_keys(s.session_id):  # files and history expire together with the session
                assert 0 < await store._redis.pttl(key) <= 2000
            await asyncio.sleep(1.2)
            assert await store.get(s.session_id) is not None  # a read is activity: TTL restarts
            for key in session_keys(s.session_id):
                assert await store._redis.pttl(key) > 1500
            await asyncio.sleep(2.3)
            assert await store.get(s.session_id) is None
            assert await store._redis.exists(*session_keys(s.session_id)) == 0

    run(scenario())


def test_ttl_defaults_and_caps(redis_url):
    async def scenario():
        config = SessionConfig(default_ttl_s=60, max_ttl_s=120)
        async with open_store(redis_url, config) as store:
            assert (await store.create()).ttl_s == 60
            assert (await store.create(ttl_s=0)).ttl_s == 60
            capped = await store.create(ttl_s=10_000)
            assert capped.ttl_s == 120 and await store._redis.ttl(session_keys(capped.session_id)[0]) == 120
            with pytest.raises(ValueError):
                await store.create(ttl_s=-1)

    run(scenario())


def test_concurrent_appends_from_two_replicas_lose_nothing(redis_url):
    async def scenario():
        async with open_store(redis_url) as a, open_store(redis_url) as b:
            s = await a.create()
            shared_hash, shared = image()
            turns = [Turn(f"<image>\nq{i}", f"a{i}", (ref(shared_hash),)) for i in range(50)]
            counts = await asyncio.gather(*(
                (a if i % 2 else b).append_turn(s.session_id, t, {shared_hash: shared})
                for i, t in enumerate(turns)
            ))
            assert sorted(counts) == list(range(1, 51))
            got = await b.get(s.session_id)
            assert sorted(t.user for t in got.turns) == sorted(t.user for t in turns)
            assert got.image_bytes == len(shared)  # the same file, stored and counted once

    run(scenario())


def test_image_bytes_are_kept_for_re_encoding(redis_url):
    async def scenario():
        async with open_store(redis_url) as store:
            s = await store.create()
            (h1, d1), (h2, d2) = image(500), image(700)
            await store.append_turn(s.session_id, Turn("<image>\n<image>\nCompare.", "Same.",
                                                       (ref(h1), ref(h2))), {h1: d1, h2: d2})
            assert await store.get_image(s.session_id, h1) == d1
            assert await store.get_images(s.session_id, [h2, h1, "0" * 64]) == {h2: d2, h1: d1}
            # A later turn may reference a stored file without sending it again.
            await store.append_turn(s.session_id, Turn("<image>\nAgain?", "Yes.", (ref(h1),)))
            assert (await store.get(s.session_id)).image_bytes == len(d1) + len(d2)

            h3, d3 = image()
            with pytest.raises(ValueError, match="does not hold"):
                await store.append_turn(s.session_id, Turn("<image>\nNew?", "?", (ref(h3),)))
            with pytest.raises(ValueError, match="hash to"):
                await store.append_turn(s.session_id, Turn("<image>\nNew?", "?", (ref(h3),)), {h3: d1})
            with pytest.raises(ValueError, match="not referenced"):
                await store.append_turn(s.session_id, Turn("No image", "ok"), {h3: d3})
            assert len((await store.get(s.session_id)).turns) == 2  # rejected turns left no trace

    run(scenario())


def test_size_caps(redis_url):
    async def scenario():
        config = SessionConfig(max_image_bytes=2000, max_session_image_bytes=3000, max_turns=3,
                               max_text_bytes=100)
        async with open_store(redis_url, config) as store:
            s = await store.create()
            big_hash, big = image(2001)
            with pytest.raises(SessionTooLarge, match="per-image limit"):
                await store.append_turn(s.session_id, Turn("<image>", "x", (ref(big_hash),)), {big_hash: big})
            (h1, d1), (h2, d2) = image(1800), image(1800)
            await store.append_turn(s.session_id, Turn("<image>", "one", (ref(h1),)), {h1: d1})
            with pytest.raises(SessionTooLarge, match="3000"):
                await store.append_turn(s.session_id, Turn("<image>", "two", (ref(h2),)), {h2: d2})
            with pytest.raises(SessionTooLarge, match="text"):
                await store.append_turn(s.session_id, Turn("x" * 101, ""))
            got = await store.get(s.session_id)
            assert len(got.turns) == 1 and got.image_bytes == 1800
            assert await store.get_image(s.session_id, h2) is None

            await store.append_turn(s.session_id, Turn("2", "2"))
            await store.append_turn(s.session_id, Turn("3", "3"))
            with pytest.raises(SessionTooLarge, match="turns"):
                await store.append_turn(s.session_id, Turn("4", "4"))

    run(scenario())


def test_corrupted_turn_is_a_clear_error(redis_url):
    async def scenario():
        async with open_store(redis_url) as store:
            s = await store.create()
            await store._redis.rpush(session_keys(s.session_id)[1], b"{not json")
            with pytest.raises(SessionCorrupted):
                await store.get(s.session_id)

    run(scenario())


def test_redis_down_is_unavailable(redis_server):
    async def scenario():
        async with open_store(redis_server.url) as store:
            s = await store.create()
            redis_server.stop()
            with pytest.raises(SessionStoreUnavailable):
                await store.get(s.session_id)
            with pytest.raises(SessionStoreUnavailable):
                await store.append_turn(s.session_id, Turn("hi", "hello"))
            with pytest.raises(SessionStoreUnavailable):
                await store.create()

    run(scenario())


async def make_full(client: Any) -> None:
    """Put maxmemory below what Redis already holds: every write that needs memory is refused.

    (Filling it with data instead is fuzzy: a refused big write's buffer is freed, and Redis then
    has room again for small writes.)
    """
    used = (await client.info("memory"))["used_memory"]
    await client.config_set("maxmemory", used // 2)


def test_full_redis_refuses_appends_but_serves_reads_and_deletes(start_redis: Callable[..., Any]):
    server = start_redis(maxmemory="2mb", maxmemory_policy="noeviction")

    async def scenario():
        async with open_store(server.url) as store:
            s = await store.create()
            await store.append_turn(s.session_id, Turn("first", "turn"))
            await make_full(store._redis)
            # Full is its own error (RESOURCE_EXHAUSTED at the gateway), not "unavailable".
            with pytest.raises(SessionStoreFull, match="maxmemory"):
                await store.append_turn(s.session_id, Turn("second", "turn"))
            with pytest.raises(SessionStoreFull, match="nothing was stored"):
                await store.create()
            got = await store.get(s.session_id)
            assert [t.user for t in got.turns] == ["first"]
            assert await store.delete(s.session_id)  # deleting frees memory, so it must work too

    run(scenario())


def test_a_retried_append_is_stored_once(redis_url):
    """The client retries once on a dropped connection, possibly after Redis ran the append."""

    async def scenario():
        async with open_store(redis_url) as store:
            s = await store.create()
            turn = Turn("question", "answer")
            assert await store.append_turn(s.session_id, turn) == 1
            assert await store.append_turn(s.session_id, turn) == 1  # the same call again: a no-op
            assert await store.append_turn(s.session_id, Turn("question", "answer")) == 2  # a new turn
            assert len((await store.get(s.session_id)).turns) == 2

    run(scenario())
