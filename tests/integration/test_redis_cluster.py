"""Both stores on a real 3-node Redis Cluster (tests/redis_server.py: `RedisClusterServers`).

A session's keys share one hash tag `{session_id}`, so they live in one slot and its Lua scripts stay
atomic; different sessions spread over the nodes. Feature keys spread over the nodes too, and the
single-flight (in-process, and across replicas through a lock key) holds whichever node a key is on.
First the stores alone, then two real gateway processes in front of a session cluster and a
feature cluster: a multi-turn session with images, served by either replica, and one encoding for
many concurrent requests of one new image.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import grpc
import pytest

from gateway.feature_cache import KEY_PREFIX, Entry, FeatureCache, redis_client
from gateway.sessions import ImageRef, SessionStore, SessionStoreFull, Turn, session_keys
from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc, tensor_pb2, vision_pb2
from services.common.server import channel_options
from tests.conftest import load_kit
from tests.integration.hardening import ENCODER, chat_request, fresh_image, read_metric, start_decoder, start_gateway
from tests.integration.procs import ServiceProcess
from tests.integration.stack import model_args
from tests.redis_server import FEATURES_CONF, SESSIONS_CONF, RedisClusterServers, command

KIT = load_kit()


@pytest.fixture(scope="module")
def session_cluster(tmp_path_factory) -> Iterator[RedisClusterServers]:
    with RedisClusterServers(tmp_path_factory.mktemp("session-cluster"), config_file=SESSIONS_CONF) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def feature_cluster(tmp_path_factory) -> Iterator[RedisClusterServers]:
    with RedisClusterServers(tmp_path_factory.mktemp("feature-cluster"), config_file=FEATURES_CONF) as cluster:
        yield cluster


@asynccontextmanager
async def session_store(url: str):
    client = redis_client(url, timeout_s=5)
    try:
        yield SessionStore(client)
    finally:
        await client.aclose()


def image_turn(n: int) -> tuple[Turn, dict[str, bytes]]:
    data = f"image {n}".encode()
    digest = hashlib.sha256(data).hexdigest()
    return Turn(user=f"<image>\nturn {n}", assistant=f"answer {n}", images=(ImageRef(digest, 12, 1, True, 1),)), {
        digest: data}


def slots_of(cluster: RedisClusterServers, keys: list[str]) -> set[int]:
    return {int(command(cluster.nodes[0].port, "CLUSTER", "KEYSLOT", k).strip(b":\r\n")) for k in keys}


# ------------------------------------------------------------------------------------ the stores alone


def test_sessions_across_slots(session_cluster: RedisClusterServers) -> None:
    async def main() -> list[str]:
        async with session_store(session_cluster.url) as store:
            assert await store.policy_problem() is None  # every node runs noeviction
            ids = [(await store.create(system_message=f"system {i}")).session_id for i in range(12)]
            for i, session_id in enumerate(ids):
                assert len(slots_of(session_cluster, session_keys(session_id))) == 1  # one slot per session
                for n in range(2):
                    turn, files = image_turn(10 * i + n)
                    assert await store.append_turn(session_id, turn, files) == n + 1
            for i, session_id in enumerate(ids):
                session = await store.get(session_id)
                assert session is not None and session.system_message == f"system {i}"
                assert [t.assistant for t in session.turns] == [f"answer {10 * i}", f"answer {10 * i + 1}"]
                digest = session.turns[1].images[0].content_hash
                assert await store.get_image(session_id, digest) == f"image {10 * i + 1}".encode()
            assert await store.delete(ids[0]) and await store.get(ids[0]) is None
        return ids

    ids = asyncio.run(main())
    nodes = {session_cluster.node_for_key(session_keys(i)[0]).port for i in ids}
    assert len(nodes) >= 2, "12 sessions all on one node: the keys do not spread over the slots"


def test_concurrent_appends_from_two_replicas_on_a_cluster_lose_nothing(session_cluster: RedisClusterServers) -> None:
    async def main() -> None:
        async with session_store(session_cluster.url) as a, session_store(session_cluster.url) as b:
            session_id = (await a.create()).session_id
            turns = [Turn(user=f"q{i}", assistant=f"a{i}") for i in range(20)]
            await asyncio.gather(*((a if i % 2 else b).append_turn(session_id, t) for i, t in enumerate(turns)))
            session = await a.get(session_id)
            assert session is not None and sorted(t.user for t in session.turns) == sorted(t.user for t in turns)

    asyncio.run(main())


def test_full_cluster_node_refuses_with_session_store_full(session_cluster: RedisClusterServers) -> None:
    async def main() -> None:
        async with session_store(session_cluster.url) as store:
            session_id = (await store.create()).session_id
            await store.append_turn(session_id, Turn(user="q", assistant="a"))
            node = session_cluster.node_for_key(session_keys(session_id)[0])
            command(node.port, "CONFIG", "SET", "maxmemory", "1")
            try:
                with pytest.raises(SessionStoreFull):
                    await store.append_turn(session_id, Turn(user="q2", assistant="a2"))
                session = await store.get(session_id)  # reads keep working; nothing was dropped
                assert session is not None and [t.user for t in session.turns] == ["q"]
            finally:
                command(node.port, "CONFIG", "SET", "maxmemory", "0")
            assert await store.append_turn(session_id, Turn(user="q2", assistant="a2")) == 2

    asyncio.run(main())


def test_feature_cache_single_flight_across_slots_and_replicas(feature_cluster: RedisClusterServers) -> None:
    keys = [KEY_PREFIX + hashlib.sha256(f"image {n}".encode()).hexdigest() for n in range(6)]
    computed: list[str] = []

    async def main() -> None:
        clients = [redis_client(feature_cluster.url, timeout_s=5) for _ in range(2)]
        replicas = [FeatureCache(c) for c in clients]  # two gateways' caches, sharing the cluster
        release = asyncio.Event()
        try:
            def compute_for(key: str):
                async def compute() -> Entry:
                    computed.append(key)
                    await release.wait()  # held until every other caller is waiting on this compute
                    return Entry(tensor_pb2.DTYPE_FLOAT32, (1, 2, 4), bytes(32))
                return compute

            calls = [asyncio.ensure_future(cache.get_or_compute(key, compute_for(key)))
                     for key in keys for cache in replicas for _ in range(3)]
            # Per key: 2 followers join in each replica, and the replica without the lock waits on it.
            # (Released well within FeatureCacheConfig.lock_wait_s, after which a waiter computes too.)
            deadline = time.monotonic() + 4
            while (sum(c.stats.coalesced for c in replicas) < len(keys) * 4
                   or sum(c.stats.lock_waits for c in replicas) < len(keys)):
                assert time.monotonic() < deadline, [c.stats for c in replicas]
                await asyncio.sleep(0.01)
            release.set()
            results = await asyncio.gather(*calls)
            assert all(entry.shape == (1, 2, 4) for entry, _ in results)
            assert sorted(computed) == sorted(keys), "each key computed exactly once"
            again = await asyncio.gather(*(replicas[1].get(key) for key in keys))
            assert all(entry is not None for entry in again)
        finally:
            for c in clients:
                await c.aclose()

    asyncio.run(main())
    assert len({feature_cluster.node_for_key(k).port for k in keys}) >= 2, "all keys on one node"


# ------------------------------------------------------------------------------------ gateways on clusters


class ClusterStack:
    def __init__(self, sessions: RedisClusterServers, features: RedisClusterServers):
        self.encoder = ServiceProcess(ENCODER, model_args(KIT.root))
        self.decoder: ServiceProcess | None = None
        self.gateways: list[ServiceProcess] = []
        self.metrics_ports: list[dict[str, int]] = []
        self.urls = ["--session-redis-url", sessions.url, "--feature-cache-url", features.url]

    def start(self) -> ClusterStack:
        with ThreadPoolExecutor(2) as pool:
            encoder = pool.submit(self.encoder.start)
            decoder = pool.submit(start_decoder, KIT.root)
            encoder.result()
            self.decoder = decoder.result()
        for _ in range(2):  # two replicas
            ports: dict[str, int] = {}
            self.gateways.append(start_gateway(self.encoder.address, self.decoder.address, self.urls[1], self.urls,
                                               ports))
            self.metrics_ports.append(ports)
        return self

    def computes(self) -> float:
        values = [read_metric(p["gateway"], "ivl_gateway_feature_cache_computes_total") for p in self.metrics_ports]
        assert None not in values
        return sum(values)

    def stop(self) -> None:
        for proc in [*self.gateways, self.decoder, self.encoder]:
            if proc is not None:
                proc.stop()


@pytest.fixture(scope="module")
def stack(session_cluster, feature_cluster) -> Iterator[ClusterStack]:
    s = ClusterStack(session_cluster, feature_cluster)
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def stubs(stack: ClusterStack) -> Iterator[list[gateway_pb2_grpc.GatewayStub]]:
    channels = [grpc.insecure_channel(g.address, options=channel_options(64 << 20, 64 << 20)) for g in stack.gateways]
    yield [gateway_pb2_grpc.GatewayStub(c) for c in channels]
    for c in channels:
        c.close()


def test_gateways_start_on_clusters_without_warnings(stack: ClusterStack) -> None:
    for gateway in stack.gateways:
        log = gateway.output_tail(100_000)
        assert "share one Redis" not in log and "may evict sessions" not in log


def test_multi_turn_session_with_images_on_either_replica(stack: ClusterStack, stubs) -> None:
    a, b = stubs
    session_ids = [a.CreateSession(gateway_pb2.CreateSessionRequest(), timeout=30).session_id for _ in range(4)]
    for turn in range(3):
        for i, session_id in enumerate(session_ids):
            gw = (a, b)[(turn + i) % 2]  # alternate replicas: the state is in the cluster only
            request = gateway_pb2.ChatRequest(
                session_id=session_id, text=f"<image>\nTurn {turn}: what is this?",
                images=[vision_pb2.ImageInput(data=fresh_image(7000 + 10 * i + turn))],
                generation=decoder_pb2.SamplingParams(max_new_tokens=4))
            reply = gw.Chat(request, timeout=120)
            assert reply.usage.prompt_tokens > 256 * (turn + 1)  # every earlier turn's image is in the prompt
    for session_id in session_ids:
        session = b.GetSession(gateway_pb2.GetSessionRequest(session_id=session_id), timeout=30)
        assert [t.user.split(":")[0] for t in session.turns] == ["<image>\nTurn 0", "<image>\nTurn 1",
                                                                 "<image>\nTurn 2"]
        assert all(len(t.image_hashes) == 1 for t in session.turns)


def test_single_flight_encoding_across_replicas(stack: ClusterStack, stubs) -> None:
    images = [fresh_image(7500 + n) for n in range(3)]
    before = stack.computes()
    requests = [(stubs[k % 2], image) for image in images for k in range(6)]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda pair: pair[0].Chat(chat_request("Describe.", [pair[1]]), timeout=120),
                                requests))
    assert all(r.usage.prompt_tokens > 256 for r in replies)
    for n, image in enumerate(images):  # same image, same answer, however it was served
        assert len({r.text for (_, img), r in zip(requests, replies, strict=True) if img == image}) == 1, n
    assert stack.computes() - before == len(images), "each new image encoded once across both replicas"
