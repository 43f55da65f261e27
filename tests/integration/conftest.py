"""Integration fixtures: real redis-server processes (see tests/redis_server.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# tests/ is on sys.path: pytest inserts it for tests/conftest.py (rootdir-relative "prepend" imports).
from redis_server import RedisServer, RedisServerMissing


def _new_server(workdir: Path, **kwargs: str | None) -> RedisServer:
    try:
        return RedisServer(workdir, **kwargs)
    except RedisServerMissing as e:
        missing = str(e)
    # Fail, not skip: a skipped Redis suite looks green while nothing was tested.
    pytest.fail(missing, pytrace=False)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server per test (tests may stop, pause or restart it)."""
    server = _new_server(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory for extra servers, e.g. `start_redis(maxmemory="2mb", maxmemory_policy="noeviction")`."""
    servers: list[RedisServer] = []

    def start(*, maxmemory: str | None = None, maxmemory_policy: str | None = None) -> RedisServer:
        workdir = tmp_path / f"redis-{len(servers)}"
        server = _new_server(workdir, maxmemory=maxmemory, maxmemory_policy=maxmemory_policy)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
