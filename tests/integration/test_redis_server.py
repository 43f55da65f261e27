"""The redis-server test helper itself: start, faults, settings, and a clear failure without Redis."""

from __future__ import annotations

import socket

import pytest
import redis
from redis_server import (
    FEATURES_CONF,
    REDIS_SERVER_ENV,
    SESSIONS_CONF,
    RedisClusterServers,
    RedisServer,
    RedisServerMissing,
    command,
    ping,
)


def test_stop_restart_keeps_the_port_and_loses_the_data(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.set("k", "v")
    port = redis_server.port
    redis_server.stop()
    assert not redis_server.running and not ping(port)
    redis_server.restart()
    assert redis_server.port == port and ping(port)
    assert client.get("k") is None  # nothing persisted
    client.close()


def test_pause_and_resume(redis_server):
    redis_server.pause()
    assert not ping(redis_server.port)
    redis_server.resume()
    assert ping(redis_server.port)


def test_maxmemory_and_policy_are_applied(start_redis):
    server = start_redis(maxmemory="2mb", maxmemory_policy="noeviction")
    client = redis.Redis.from_url(server.url)
    assert client.config_get("maxmemory")["maxmemory"] == str(2 * 1024 * 1024)
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    client.close()


def test_a_taken_port_is_replaced(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with RedisServer(tmp_path, port=taken) as server:
            assert server.port != taken and ping(server.port)


def test_missing_binary_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(REDIS_SERVER_ENV, str(tmp_path / "no-such-redis-server"))
    with pytest.raises(RedisServerMissing, match="redis-server not found"):
        RedisServer(tmp_path)


def test_the_session_config_persists_across_a_kill(tmp_path):
    """With the deployments' sessions.conf, a SIGKILLed server comes back from its append-only file."""
    with RedisServer(tmp_path / "sessions", config_file=SESSIONS_CONF) as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        server.restart()  # SIGKILL, then the same port and directory
        assert client.get("k") == b"v"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.close()
    with RedisServer(tmp_path / "features", config_file=FEATURES_CONF) as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        server.restart()
        assert client.get("k") is None  # the feature cache persists nothing
        client.close()


def test_cluster_of_three_nodes(tmp_path):
    with RedisClusterServers(tmp_path, size=3) as cluster:
        assert cluster.url.startswith("redis+cluster://127.0.0.1:")
        info = command(cluster.nodes[0].port, "CLUSTER", "INFO")
        assert b"cluster_state:ok" in info and b"cluster_slots_assigned:16384" in info
        owners = {cluster.node_for_key(f"key{i}").port for i in range(30)}
        assert owners == {node.port for node in cluster.nodes}
    assert not any(node.running for node in cluster.nodes)
