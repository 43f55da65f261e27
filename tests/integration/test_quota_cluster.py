"""The quota scripts on a real 3-node Redis Cluster: every tenant's keys share one slot, so each
check-and-take runs as one script there, and tenants spread over the nodes."""

from __future__ import annotations

import asyncio

from gateway.quota_store import QuotaStore, quota_keys
from gateway.redis_connect import prepare, redis_client
from tests.redis_server import SESSIONS_CONF, RedisClusterServers

T0 = 1_800_000_000_000


def test_quotas_on_a_redis_cluster(tmp_path) -> None:
    tenants = [f"team-{i}" for i in range(12)]

    async def scenario(url: str):
        client = redis_client(url, timeout_s=5)
        try:
            await prepare(client)
            store = QuotaStore(client)
            out = {}
            for t in tenants:
                out[t] = [await store.admit(t, T0, call_ids=[f"{t}-{i}"], requests_per_minute=2,
                                            tokens_per_minute=100, tokens=10, concurrent=5, lease_end_ms=T0 + 60_000)
                          for i in range(3)]
                await store.open_session(t, T0, "s1", T0 + 60_000, 10, 1, 100)
                out[t].append(await store.open_session(t, T0, "s2", T0 + 60_000, 10, 1, 100))
                out[t].append(await store.usage(t, T0))
            return out
        finally:
            await client.aclose()

    with RedisClusterServers(tmp_path / "cluster", config_file=SESSIONS_CONF) as cluster:
        out = asyncio.run(scenario(cluster.url))
        nodes = {cluster.node_for_key(quota_keys(t)["rate"]).port for t in tenants}
    for t in tenants:
        assert out[t] == [(True, "", 0), (True, "", 0), (False, "requests_per_minute", 30_000),
                          (False, "live_sessions", 1), (1, 10)], t
    assert len(nodes) > 1  # tenants spread over the nodes
