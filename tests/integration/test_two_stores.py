"""Sessions and features in two Redis with two policies, driven through the real gateway process.

The session store runs the deployments' own deploy/k8s/redis/sessions.conf (noeviction, append-only
file fsynced every second), the feature cache their features.conf (LRU, nothing persisted) with a
`maxmemory` of a few MB, as a new deployment sized too small would have it. Pinned here:
- a flood of new images evicts features, never a session (nor a session's stored image);
- the session store SIGKILLed and restarted from its append-only file: sessions and turns are back,
  and the next turn works;
- the session store down: session calls fail fast with UNAVAILABLE naming the session store, while
  one-off chats keep working; full (noeviction at maxmemory): RESOURCE_EXHAUSTED, nothing lost;
- the feature cache down: everything keeps working, uncached, and the metrics count it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import redis

from gateway.feature_cache import KEY_PREFIX, LOCK_SUFFIX
from gateway.sessions import KEY_PREFIX as SESSION_PREFIX
from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc, vision_pb2
from services.common.server import channel_options
from tests.conftest import load_kit
from tests.integration.hardening import ENCODER, chat_request, png, read_metric, start_decoder, start_gateway
from tests.integration.procs import ServiceProcess
from tests.integration.stack import model_args
from tests.redis_server import FEATURES_CONF, SESSIONS_CONF, RedisServer

KIT = load_kit()
T = TypeVar("T")
FAST_S = 5.0  # "at once": far below any deadline, generous for a loaded 2-core machine
FEATURE_MAXMEMORY = "3mb"  # a few MB over an empty Redis's own ~1 MB: a handful of images fill it


class Stores:
    """Encoder, decoder, the two Redis and a gateway on them, with its metrics port."""

    def __init__(self, workdir: Path):
        self.sessions = RedisServer(workdir / "sessions", config_file=SESSIONS_CONF)
        self.features = RedisServer(workdir / "features", config_file=FEATURES_CONF, maxmemory=FEATURE_MAXMEMORY)
        self.encoder = ServiceProcess(ENCODER, model_args(KIT.root))
        self.decoder: ServiceProcess | None = None
        self.gateway: ServiceProcess | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> Stores:
        self.sessions.start()
        self.features.start()
        with ThreadPoolExecutor(2) as pool:
            encoder = pool.submit(self.encoder.start)
            decoder = pool.submit(start_decoder, KIT.root)
            encoder.result()
            self.decoder = decoder.result()
        self.gateway = start_gateway(self.encoder.address, self.decoder.address, self.features.url,
                                     ["--session-redis-url", self.sessions.url,
                                      "--feature-cache-url", self.features.url], self.ports)
        return self

    def metric(self, name: str) -> float:
        value = read_metric(self.ports["gateway"], name)
        assert value is not None, f"the gateway exports no {name}"
        return value

    def cache_failures(self) -> float:
        """Feature-cache calls that failed or were skipped while Redis was marked down."""
        return self.metric("ivl_gateway_feature_cache_errors_total") + self.metric(
            "ivl_gateway_feature_cache_bypassed_total")

    def stop(self) -> None:
        for proc in (self.gateway, self.decoder, self.encoder):
            if proc is not None:
                proc.stop()
        self.sessions.stop()
        self.features.stop()


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Iterator[Stores]:
    s = Stores(tmp_path_factory.mktemp("two-stores"))
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def gw(stores: Stores) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    assert stores.gateway is not None
    channel = grpc.insecure_channel(stores.gateway.address, options=channel_options(64 << 20, 64 << 20))
    yield gateway_pb2_grpc.GatewayStub(channel)
    channel.close()


def client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=5)


def evicted_keys(server: RedisServer) -> int:
    with client(server) as r:
        return int(r.info("stats")["evicted_keys"])


def feature_keys(server: RedisServer) -> set[bytes]:
    with client(server) as r:
        return {k for k in r.scan_iter(match=KEY_PREFIX + "*") if not k.endswith(LOCK_SUFFIX.encode())}


_colours = iter(range(5000, 6000))


def big_image() -> bytes:
    """Never sent before; 1344x896 px = 6 tiles + a thumbnail: ~450 KB of features on the tiny model."""
    n = next(_colours)
    return png(1344, 896, (n % 251, (n // 251) % 251, 131))


def new_session(gw) -> str:
    return gw.CreateSession(gateway_pb2.CreateSessionRequest(), timeout=30).session_id


def session_chat(gw, session_id: str, text: str, images: tuple[bytes, ...] = ()) -> gateway_pb2.ChatResponse:
    request = gateway_pb2.ChatRequest(session_id=session_id, text=text,
                                      images=[vision_pb2.ImageInput(data=d) for d in images],
                                      generation=decoder_pb2.SamplingParams(max_new_tokens=4))
    return gw.Chat(request, timeout=60)


def get_session(gw, session_id: str) -> gateway_pb2.Session:
    return gw.GetSession(gateway_pb2.GetSessionRequest(session_id=session_id), timeout=30)


def expect_error(call: Callable[[], object], code: grpc.StatusCode, within_s: float = FAST_S) -> grpc.RpcError:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call()
    elapsed = time.monotonic() - started
    assert err.value.code() == code, f"{err.value.code()}: {err.value.details()}"
    assert elapsed < within_s, f"{code.name} took {elapsed:.1f}s"
    return err.value


def eventually(call: Callable[[], T], timeout_s: float = 30.0) -> T:
    """`call()` once the store is back: retried while it fails with UNAVAILABLE."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


# ------------------------------------------------------------------------------------ tests


def test_gateway_runs_two_stores_without_the_shared_instance_warning(stores: Stores) -> None:
    assert stores.gateway is not None
    log = stores.gateway.output_tail(100_000)
    assert "share one Redis" not in log and "may evict sessions" not in log
    with client(stores.sessions) as r:
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert r.config_get("appendonly")["appendonly"] == "yes"
        assert r.config_get("appendfsync")["appendfsync"] == "everysec"
    with client(stores.features) as r:
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
        assert r.config_get("appendonly")["appendonly"] == "no"


def test_flood_of_new_images_never_evicts_a_session(stores: Stores, gw) -> None:
    first = big_image()
    session_id = new_session(gw)
    reply = session_chat(gw, session_id, "<image>\nWhat is this?", (first,))
    assert reply.usage.prompt_tokens > 7 * 256  # all 7 tiles' tokens
    before = evicted_keys(stores.features)
    with ThreadPoolExecutor(4) as pool:  # ~7 MB of new features into a 3 MB cache
        replies = list(pool.map(lambda img: gw.Chat(chat_request("Describe.", [img]), timeout=120),
                                [big_image() for _ in range(16)]))
    assert all(r.finish_reason for r in replies)
    assert evicted_keys(stores.features) > before, "the flood did not fill the feature cache"
    assert evicted_keys(stores.sessions) == 0
    session = get_session(gw, session_id)
    assert len(session.turns) == 1 and session.turns[0].image_hashes
    # The first image's features were evicted: the next turn re-encodes them from the session's bytes.
    assert session_chat(gw, session_id, "And the colours?").usage.prompt_tokens > reply.usage.prompt_tokens
    assert len(get_session(gw, session_id).turns) == 2


def test_session_store_killed_and_restarted_from_its_append_only_file(stores: Stores, gw) -> None:
    session_id = new_session(gw)
    session_chat(gw, session_id, "<image>\nWhat is this?", (big_image(),))
    session_chat(gw, session_id, "Hello again")
    stored = get_session(gw, session_id)
    stores.sessions.stop()  # SIGKILL: no shutdown, no final save; only the append-only file remains
    try:
        expect_error(lambda: get_session(gw, session_id), grpc.StatusCode.UNAVAILABLE)
    finally:
        stores.sessions.start(keep_port=True)
    restored = eventually(lambda: get_session(gw, session_id))
    assert [(t.user, t.assistant, list(t.image_hashes)) for t in restored.turns] == \
        [(t.user, t.assistant, list(t.image_hashes)) for t in stored.turns]
    assert session_chat(gw, session_id, "And then?").finish_reason
    assert len(get_session(gw, session_id).turns) == 3


def test_session_store_down_fails_session_calls_clearly_and_serves_one_off_chats(stores: Stores, gw) -> None:
    session_id = new_session(gw)
    session_chat(gw, session_id, "Hello")
    stores.sessions.stop()
    try:
        for call in (lambda: new_session(gw), lambda: session_chat(gw, session_id, "More?"),
                     lambda: get_session(gw, session_id)):
            err = expect_error(call, grpc.StatusCode.UNAVAILABLE)
            assert "session store" in err.details()
        # No session, no session store: served as ever, with the feature cache.
        assert gw.Chat(chat_request("Describe.", [big_image()]), timeout=60).usage.prompt_tokens > 7 * 256
        assert gw.Chat(chat_request("Hello"), timeout=60).finish_reason
    finally:
        stores.sessions.start(keep_port=True)
    assert eventually(lambda: session_chat(gw, session_id, "More?")).finish_reason
    assert len(get_session(gw, session_id).turns) == 2


def test_session_store_full_is_resource_exhausted_and_loses_nothing(stores: Stores, gw) -> None:
    session_id = new_session(gw)
    session_chat(gw, session_id, "Hello")
    with client(stores.sessions) as r:
        keys_before = r.dbsize()
        r.config_set("maxmemory", "1")  # below what it already holds: every write is refused
        try:
            err = expect_error(lambda: new_session(gw), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "session store is full" in err.details() and "intact" in err.details()
            err = expect_error(lambda: session_chat(gw, session_id, "More?"), grpc.StatusCode.RESOURCE_EXHAUSTED,
                               within_s=60)
            assert "session store is full" in err.details()
            assert gw.Chat(chat_request("Hello"), timeout=60).finish_reason  # one-off chats go on
            assert len(get_session(gw, session_id).turns) == 1  # reads work; nothing was dropped
            assert r.dbsize() == keys_before
        finally:
            r.config_set("maxmemory", "0")
    assert session_chat(gw, session_id, "More?").finish_reason
    assert len(get_session(gw, session_id).turns) == 2


def test_feature_store_down_everything_works_uncached(stores: Stores, gw) -> None:
    image = big_image()
    answer = gw.Chat(chat_request("Describe.", [image]), timeout=60).text
    failures_before = stores.cache_failures()
    computes_before = stores.metric("ivl_gateway_feature_cache_computes_total")
    stores.features.stop()
    try:
        assert gw.Chat(chat_request("Describe.", [image]), timeout=60).text == answer  # encoded again
        session_id = new_session(gw)
        assert session_chat(gw, session_id, "<image>\nWhat is this?", (big_image(),)).finish_reason
        # The decoder holds the history's KV (lazy images): its image needs neither Redis nor the encoder.
        assert session_chat(gw, session_id, "And then?").finish_reason
        assert len(get_session(gw, session_id).turns) == 2
    finally:
        stores.features.start(keep_port=True)  # empty: it persists nothing
    assert stores.cache_failures() > failures_before, "falling back to the encoder must be counted"
    assert stores.metric("ivl_gateway_feature_cache_computes_total") >= computes_before + 2
    # Back: features are cached again (after the gateway's short back-off, FeatureCacheConfig.retry_after_s).
    deadline = time.monotonic() + 30
    while not feature_keys(stores.features):
        assert time.monotonic() < deadline, "the feature cache was not used again"
        gw.Chat(chat_request("Describe.", [big_image()]), timeout=60)
        time.sleep(0.2)


def test_one_redis_for_both_stores_is_warned_about(stores: Stores) -> None:
    """The old single-URL setup still starts, and says why it should not be kept."""
    assert stores.decoder is not None
    gateway = start_gateway(stores.encoder.address, stores.decoder.address, stores.features.url)
    try:
        log = gateway.output_tail(100_000)
        assert "share one Redis" in log
        assert re.search(r"session store .*maxmemory-policy is allkeys-lru", log), log[-2000:]
    finally:
        gateway.stop()


def test_session_keys_live_only_in_the_session_store(stores: Stores, gw) -> None:
    session_id = new_session(gw)
    session_chat(gw, session_id, "<image>\nWhat is this?", (big_image(),))
    with client(stores.sessions) as sessions, client(stores.features) as features:
        assert list(sessions.scan_iter(match=f"{SESSION_PREFIX}{{{session_id}}}:*"))
        assert not list(features.scan_iter(match=SESSION_PREFIX + "*"))
        assert not list(sessions.scan_iter(match=KEY_PREFIX + "*"))
