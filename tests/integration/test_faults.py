"""Faults survived with nothing lost: the real processes are killed, paused and restarted.

One stack (redis-server, encoder, decoder, gateway) serves the peer and Redis faults; each test
leaves it whole again. A second, tight decoder (`--max-num-seqs 1 --max-queue-size 1`) behind its own
gateway serves the cancel, deadline and overload tests. Freed memory is read from the decoder's
metrics endpoint (no sequence running or waiting, no KV block held), and a burst of requests
(retrying when refused, after the `retry-after-ms` hint) must then all succeed.

Decisions these tests pin down:
- a peer down is UNAVAILABLE at once (fail-fast calls, no waiting for the deadline), and the
  gateway's channels reconnect by themselves when the peer is back on its address;
- while the encoder is down, text-only turns and images whose features are cached still work;
- Redis is an optimisation for one-off chats (served without the cache while it is down, paused or
  full) but the store of record for sessions: session calls are UNAVAILABLE while it cannot be read
  or written (RESOURCE_EXHAUSTED while it is full), and a session's turns are intact once it is
  back; after a flush (or a restart of a Redis that persists nothing) sessions are NOT_FOUND and
  features are recomputed (this stack runs one Redis for both stores, the trial setup);
- a corrupted cache entry is detected by its checksum, dropped, recomputed and stored again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import pytest
import redis

from gateway.feature_cache import KEY_PREFIX, LOCK_SUFFIX
from gateway.feature_values import entry_from_values
from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.server import channel_options
from tests.conftest import load_kit
from tests.integration.hardening import (
    DECODER,
    LONG_GENERATION,
    LONG_GENERATION_GATEWAY_ARGS,
    LONG_GENERATION_TOKENS,
    Stack,
    chat_request,
    fresh_image,
    read_metric,
    start_decoder,
    start_gateway,
    start_stack,
)
from tests.integration.procs import ServiceProcess

KIT = load_kit()
TOKENS_PER_TILE = KIT.manifest["model"]["num_image_token"]  # a fresh one-tile image adds this many prompt tokens
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
T = TypeVar("T")
FAST_S = 3.0  # "at once": far below any deadline, yet generous for a loaded 2-core CI machine


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    s = start_stack(KIT.root, tmp_path_factory.mktemp("faults"), gateway_args=LONG_GENERATION_GATEWAY_ARGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gw(stack: Stack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    channel, stub = stack.gateway_stub()
    yield stub
    channel.close()


@pytest.fixture
def r(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis.url, socket_timeout=5)
    yield client
    client.close()


def expect_error(call: Callable[[], object], code: grpc.StatusCode, within_s: float = FAST_S) -> grpc.RpcError:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call()
    elapsed = time.monotonic() - started
    assert err.value.code() == code, err.value.details()
    assert elapsed < within_s, f"{code.name} took {elapsed:.1f}s"
    return err.value


def eventually(call: Callable[[], T], timeout_s: float = 60.0) -> T:
    """`call()` once the system has recovered: retried while it fails with UNAVAILABLE."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def session_turns(gw, session_id: str) -> int:
    return len(gw.GetSession(gateway_pb2.GetSessionRequest(session_id=session_id), timeout=30).turns)


def session_chat(gw, session_id: str, text: str) -> gateway_pb2.ChatResponse:
    request = gateway_pb2.ChatRequest(session_id=session_id, text=text,
                                      generation=decoder_pb2.SamplingParams(max_new_tokens=4))
    return gw.Chat(request, timeout=30)


def new_session(gw) -> str:
    return gw.CreateSession(gateway_pb2.CreateSessionRequest(), timeout=30).session_id


def feature_keys(r: redis.Redis) -> set[bytes]:
    return {k for k in r.scan_iter(match=KEY_PREFIX + "*") if not k.endswith(LOCK_SUFFIX.encode())}


_images = iter(range(3000, 4000))


def cache_is_used_again(gw, r: redis.Redis, timeout_s: float = 10.0) -> None:
    """New images' features land in Redis again (after a connection failure the gateway skips Redis
    for a second, FeatureCacheConfig.retry_after_s, rather than pay a timeout per request)."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = feature_keys(r)
        gw.Chat(chat_request("Describe.", [fresh_image(next(_images))]), timeout=30)
        if feature_keys(r) - before:
            return
        assert time.monotonic() < deadline, "the feature cache was not used again"
        time.sleep(0.2)


# ------------------------------------------------------------------------------------ peers


def test_encoder_down_and_back(stack: Stack, gw) -> None:
    cached = fresh_image(1001)
    answer = gw.Chat(chat_request("Describe.", [cached]), timeout=30).text
    new = chat_request("Describe.", [fresh_image(1002)])
    stack.encoder.kill()
    try:
        err = expect_error(lambda: gw.Chat(new, timeout=30), UNAVAILABLE)
        assert "vision encoder" in err.details()
        # What needs no encoder still works: text-only turns, and images whose features are cached.
        assert gw.Chat(chat_request("Hello"), timeout=30).finish_reason
        assert gw.Chat(chat_request("Describe.", [cached]), timeout=30).text == answer
    finally:
        stack.encoder.start(port=stack.encoder.port)
    reply = eventually(lambda: gw.Chat(new, timeout=30))
    assert reply.usage.prompt_tokens > TOKENS_PER_TILE  # the new image was encoded by the restarted encoder


def test_decoder_down_and_back(stack: Stack, gw) -> None:
    session_id = new_session(gw)
    session_chat(gw, session_id, "Hello")
    stream = gw.ChatStream(chat_request("Tell me a story.", max_new_tokens=LONG_GENERATION_TOKENS, **LONG_GENERATION),
                           timeout=60)
    next(stream)  # mid-generation when the decoder dies
    stack.decoder.kill()
    try:
        expect_error(lambda: list(stream), UNAVAILABLE)
        err = expect_error(lambda: gw.Chat(chat_request("Hello"), timeout=30), UNAVAILABLE)
        assert "language decoder" in err.details()
        expect_error(lambda: session_chat(gw, session_id, "And then?"), UNAVAILABLE)
        assert session_turns(gw, session_id) == 1  # the failed turn was not stored
    finally:
        stack.decoder.start(port=stack.decoder.port)
    eventually(lambda: gw.Chat(chat_request("Hello"), timeout=30))
    assert session_chat(gw, session_id, "And then?").finish_reason
    assert session_turns(gw, session_id) == 2


# ------------------------------------------------------------------------------------ Redis


def test_redis_unreachable_then_back(stack: Stack, gw, r: redis.Redis) -> None:
    """SIGSTOP: connections hang instead of failing; the data survives the outage."""
    session_id = new_session(gw)
    session_chat(gw, session_id, "Hello")
    stack.redis.pause()
    try:
        started = time.monotonic()
        reply = gw.Chat(chat_request("Describe.", [fresh_image(2001)]), timeout=30)
        assert reply.usage.prompt_tokens > TOKENS_PER_TILE and time.monotonic() - started < 10
        expect_error(lambda: new_session(gw), UNAVAILABLE, within_s=10)
        err = expect_error(lambda: session_chat(gw, session_id, "More?"), UNAVAILABLE, within_s=10)
        assert "session store" in err.details()
    finally:
        stack.redis.resume()
    assert eventually(lambda: session_chat(gw, session_id, "More?")).finish_reason
    assert session_turns(gw, session_id) == 2  # nothing lost
    cache_is_used_again(gw, r)


def test_redis_killed_then_restarted(stack: Stack, gw, r: redis.Redis) -> None:
    """A crash: one-off chats go on without the cache; sessions wait for Redis (this one persists nothing)."""
    session_id = new_session(gw)
    image = fresh_image(2101)
    answer = gw.Chat(chat_request("Describe.", [image]), timeout=30).text
    stack.redis.stop()
    try:
        assert gw.Chat(chat_request("Describe.", [image]), timeout=30).text == answer  # re-encoded
        assert gw.Chat(chat_request("Hello"), timeout=30).finish_reason
        expect_error(lambda: session_turns(gw, session_id), UNAVAILABLE)
        expect_error(lambda: new_session(gw), UNAVAILABLE)
    finally:
        stack.redis.start(keep_port=True)
    assert eventually(lambda: new_session(gw))
    expect_error(lambda: session_turns(gw, session_id), grpc.StatusCode.NOT_FOUND)
    assert gw.Chat(chat_request("Describe.", [image]), timeout=30).text == answer
    cache_is_used_again(gw, r)


def test_redis_flushed(stack: Stack, gw, r: redis.Redis) -> None:
    session_id = new_session(gw)
    session_chat(gw, session_id, "Hello")
    image = fresh_image(2201)
    answer = gw.Chat(chat_request("Describe.", [image]), timeout=30).text
    assert feature_keys(r)
    r.flushall()
    assert gw.Chat(chat_request("Describe.", [image]), timeout=30).text == answer  # recomputed
    assert feature_keys(r)  # and cached again
    err = expect_error(lambda: session_chat(gw, session_id, "Again?"), grpc.StatusCode.NOT_FOUND)
    assert "not found" in err.details()
    expect_error(lambda: session_turns(gw, session_id), grpc.StatusCode.NOT_FOUND)


def test_redis_full(stack: Stack, gw, r: redis.Redis) -> None:
    """maxmemory tiny + noeviction: every write is refused (OOM); chats are served anyway."""
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")
    try:
        before = feature_keys(r)
        image = fresh_image(2301)
        first = gw.Chat(chat_request("Describe.", [image]), timeout=30)
        assert first.usage.prompt_tokens > TOKENS_PER_TILE
        assert gw.Chat(chat_request("Describe.", [image]), timeout=30).text == first.text
        assert feature_keys(r) == before  # nothing could be cached
        # Full is not down: RESOURCE_EXHAUSTED, and nothing stored was dropped (noeviction).
        err = expect_error(lambda: new_session(gw), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "session store is full" in err.details()
    finally:
        r.config_set("maxmemory", "0")
    assert new_session(gw)


def test_corrupted_cache_entry_is_dropped_and_recomputed(stack: Stack, gw, r: redis.Redis) -> None:
    image = fresh_image(2401)
    before = feature_keys(r)
    answer = gw.Chat(chat_request("Describe.", [image]), timeout=30).text
    (key,) = feature_keys(r) - before
    good = r.lrange(key, 0, -1)  # the v2 value: a header, then the encoder's chunk frames
    frame = bytearray(good[-1])
    frame[-100:-96] = bytes(b ^ 0xFF for b in frame[-100:-96])  # flip payload bytes: only the checksum can tell
    r.lset(key, len(good) - 1, bytes(frame))
    assert gw.Chat(chat_request("Describe.", [image]), timeout=30).text == answer
    assert r.lrange(key, 0, -1) == good  # recomputed and stored again
    entry_from_values(r.lrange(key, 0, -1))
    assert "dropping corrupt entry" in stack.gateway.output_tail(100_000)


# ------------------------------------------------------------------------ cancel, deadline, overload


class Tight:
    """A decoder with one sequence slot and one queue place, behind its own gateway."""

    def __init__(self, stack: Stack):
        self.ports: dict[str, int] = {}
        self.decoder = start_decoder(KIT.root, ["--max-num-seqs", "1", "--max-queue-size", "1"], self.ports)
        try:
            self.gateway: ServiceProcess = start_gateway(stack.encoder.address, self.decoder.address, stack.redis.url,
                                                         LONG_GENERATION_GATEWAY_ARGS, ports=self.ports)
        except BaseException:
            self.decoder.stop()
            raise
        self.channel = grpc.insecure_channel(self.gateway.address, options=channel_options())
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def metric(self, name: str) -> float:
        value = read_metric(self.ports.get(DECODER), name)
        assert value is not None, f"the decoder reports no {name} (is its metrics endpoint on?)"
        return value

    def wait_idle(self, timeout_s: float = FAST_S) -> None:
        """The decoder holds no sequence and no KV block: what a cancelled or expired call must leave."""
        deadline = time.monotonic() + timeout_s
        names = ("ivl_decoder_active_sequences", "ivl_decoder_waiting_sequences", "ivl_decoder_kv_cache_used_blocks")
        while any(self.metric(n) for n in names):
            assert time.monotonic() < deadline, {n: self.metric(n) for n in names}
            time.sleep(0.05)

    def burst(self, n: int = 4) -> list[gateway_pb2.ChatResponse]:
        """n concurrent calls, each retried when refused after the server's hint: all must succeed."""

        def one(_: int) -> gateway_pb2.ChatResponse:
            for _attempt in range(20):
                try:
                    return self.stub.Chat(chat_request("Hi"), timeout=30)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    time.sleep(int(dict(exc.trailing_metadata())["retry-after-ms"]) / 1000)
            raise AssertionError("still refused after 20 attempts")

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))

    def close(self) -> None:
        self.channel.close()
        self.gateway.stop()
        self.decoder.stop()


@pytest.fixture(scope="module")
def tight(stack: Stack) -> Iterator[Tight]:
    t = Tight(stack)
    yield t
    t.close()


LONG = chat_request("Tell me a story.", max_new_tokens=LONG_GENERATION_TOKENS, **LONG_GENERATION)  # ~6 s of decoding


def test_client_cancel_frees_the_sequence(tight: Tight) -> None:
    stream = tight.stub.ChatStream(LONG, timeout=60)
    next(stream)
    next(stream)
    assert tight.metric("ivl_decoder_active_sequences") == 1
    stream.cancel()
    tight.wait_idle()  # within FAST_S; left alone, this generation would run for seconds more
    assert all(r.finish_reason for r in tight.burst())


def test_deadline_frees_the_sequence(tight: Tight) -> None:
    started = time.monotonic()
    expect_error(lambda: tight.stub.Chat(LONG, timeout=1.0), grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < FAST_S
    tight.wait_idle()
    assert all(r.finish_reason for r in tight.burst())


def test_overload_is_resource_exhausted_with_a_retry_hint(tight: Tight) -> None:
    request = chat_request("Tell me a story.", max_new_tokens=400, **LONG_GENERATION)  # ~1 s each

    def one(_: int) -> grpc.StatusCode | tuple:
        try:
            tight.stub.Chat(request, timeout=60)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code(), dict(exc.trailing_metadata() or ()), exc.details()

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(one, range(6)))
    refused = [o for o in outcomes if o != grpc.StatusCode.OK]
    assert 1 <= len(refused) < len(outcomes), outcomes  # one slot, one queue place: the rest may be refused
    for code, trailers, details in refused:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "overloaded" in details
        assert int(trailers["retry-after-ms"]) > 0
    tight.wait_idle(timeout_s=30)
    assert all(r.finish_reason for r in tight.burst())
