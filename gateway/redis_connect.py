"""Redis clients for the gateway's two stores: one server, or a Redis Cluster.

A URL names one store: `redis://[[user]:password@]host:port/db`, `rediss://...` for TLS, and
`redis+cluster://` / `rediss+cluster://` for a Redis Cluster (any one node is enough: the client
reads the slot map from it and follows MOVED/ASK replies). The stores need nothing else from the
client: every multi-key operation touches the keys of one hash tag (one slot), and the Lua scripts
are routed by their keys.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.cluster
import redis.retry
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.common.security import redact_url

CLUSTER_SUFFIX = "+cluster"
SCHEMES = ("redis", "rediss")


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.endswith(CLUSTER_SUFFIX)


def check_url(url: str, flag: str) -> None:
    """ValueError naming `flag` unless `url` is one of the forms this module connects to."""
    parts = urlsplit(url)
    scheme = parts.scheme.removesuffix(CLUSTER_SUFFIX)
    if scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"{flag} must be redis://host:port/db, rediss:// (TLS), or redis+cluster:// / "
                         f"rediss+cluster:// for a Redis Cluster; got {redact_url(url)!r}")
    if is_cluster_url(url) and parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"{flag}: a Redis Cluster has only database 0, got {parts.path!r}")


def instance_address(url: str) -> tuple[str, int]:
    """(host, port) of the server a URL connects to: two stores on one address share one instance."""
    parts = urlsplit(url)
    default_port = 6380 if parts.scheme.startswith("rediss") else 6379
    return (parts.hostname or "").lower(), parts.port or default_port


def redis_client(url: str, *, timeout_s: float = 1.0) -> aioredis.Redis | RedisCluster:
    """A bytes-mode client that fails fast instead of redis-py's default of retries with backoff.

    One immediate retry reconnects a connection that a Redis restart left dead in the pool.
    """
    options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1),
                   decode_responses=False)
    if is_cluster_url(url):
        parts = urlsplit(url)
        plain = urlunsplit(parts._replace(scheme=parts.scheme.removesuffix(CLUSTER_SUFFIX)))
        # reinitialize_steps=0: a MOVED reply only updates that slot. redis-py's default reloads the
        # whole map every 5th MOVED by closing every connection, which breaks the calls other tasks
        # have in flight on them (and a retried append would then be stored twice).
        return RedisCluster.from_url(plain, reinitialize_steps=0, **options)
    return aioredis.Redis.from_url(url, **options)


def sync_redis_client(url: str, *, timeout_s: float = 1.0) -> redis.Redis | redis.cluster.RedisCluster:
    """The synchronous twin of `redis_client` (same options), for calls made in a worker thread."""
    options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                   retry=redis.retry.Retry(NoBackoff(), 1), decode_responses=False)
    if is_cluster_url(url):
        parts = urlsplit(url)
        plain = urlunsplit(parts._replace(scheme=parts.scheme.removesuffix(CLUSTER_SUFFIX)))
        return redis.cluster.RedisCluster.from_url(plain, reinitialize_steps=0, **options)
    return redis.Redis.from_url(url, **options)


async def prepare(client: aioredis.Redis | RedisCluster) -> str | None:
    """Load a cluster's slot map now, before concurrent calls arrive; what failed, if anything.

    A cluster client used before it knows the map sends its first calls to any node, and each comes
    back MOVED. Not fatal when the cluster is down at start: the client loads the map on first use.
    """
    if not isinstance(client, RedisCluster):
        return None
    try:
        await client.initialize()
    except (RedisError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
