"""Shared fixtures. Parity tests read the kit named by PARITY_KIT (default: the dev kit copy).

Real redis-server processes (tests/redis_server.py) for the integration tests and for the unit tests
of the Redis-backed stores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.redis_server import RedisServer, RedisServerMissing

DEFAULT_KIT = Path(__file__).parent / "fixtures" / "parity" / "dev"


class Kit:
    """A parity kit directory: a tiny checkpoint plus upstream goldens described by manifest.json."""

    def __init__(self, root: Path):
        self.root = root
        with (root / "manifest.json").open(encoding="utf-8") as f:
            self.manifest = json.load(f)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def npy(self, rel: str) -> np.ndarray:
        return np.load(self.root / rel)

    def text(self, rel: str) -> str:
        return (self.root / rel).read_text(encoding="utf-8")

    @property
    def images(self) -> dict[str, dict]:
        return {img["id"]: img for img in self.manifest["images"]}

    @property
    def chat_cases(self) -> dict[str, dict]:
        return {case["id"]: case for case in self.manifest["chat_cases"]}

    @property
    def tolerances(self) -> dict:
        return self.manifest["tolerances"]


def kit_root() -> Path:
    root = Path(os.environ.get("PARITY_KIT", DEFAULT_KIT)).expanduser().resolve()
    if not (root / "manifest.json").is_file():
        raise RuntimeError(f"PARITY_KIT={root} is not a parity kit (no manifest.json)")
    return root


def load_kit() -> Kit:
    return Kit(kit_root())


@pytest.fixture(scope="session")
def kit() -> Kit:
    return load_kit()


# ---------------------------------------------------------------------------------------- redis-server


def _new_redis_server(workdir: Path, **kwargs: str | None) -> RedisServer:
    try:
        return RedisServer(workdir, **kwargs)
    except RedisServerMissing as e:
        missing = str(e)
    # Fail, not skip: a skipped Redis suite looks green while nothing was tested.
    pytest.fail(missing, pytrace=False)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server per test (tests may stop, pause or restart it)."""
    server = _new_redis_server(tmp_path / "redis").start()
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
        server = _new_redis_server(workdir, maxmemory=maxmemory, maxmemory_policy=maxmemory_policy)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
