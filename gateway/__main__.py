"""`python -m gateway`: the public gRPC API and the OpenAI-compatible HTTP API in front of the encoder
and decoder replicas, both thin fronts over one turn core (gateway/core.py) in one event loop.

Every call but health, reflection and the HTTP API's docs needs `authorization: Bearer <key>` (see
gateway/config.py), unless the gateway was started with `--insecure-open`. The HTTP API listens on
`--http-port` (default 8000; 0 = off) with the gRPC server's TLS certificates. Prometheus metrics
(RPCs, `ivl_gateway_*` feature cache and embedding bytes per hop) are on `--metrics-port` (default 9101). SIGTERM drains
in-flight calls for `--grace-seconds` and exits 0.
"""

from __future__ import annotations

import logging
import sys

from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.exceptions import RedisClusterException, RedisError

from gateway.config import GatewayConfig
from gateway.core import ChatCore
from gateway.decoder_pool import DecoderPool
from gateway.feature_cache import FeatureCache
from gateway.http_server import HttpServer, create_app
from gateway.media import MediaFetcher
from gateway.models import ServedModel, ServedModels
from gateway.peers import EncoderClient
from gateway.quota_store import QuotaStore
from gateway.quotas import TenantQuotas
from gateway.redis_connect import prepare, redis_client, sync_redis_client
from gateway.routing_metrics import RoutingCollector
from gateway.servicer import GatewayServicer
from gateway.sessions import SessionStore
from gateway.transfer_stats import TransferCollector, TransferStats
from internvl.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.interceptors import ApiKeyInterceptor
from services.common.logging import configure_logging
from services.common.metrics import FeatureCacheCollector, TenantCollector
from services.common.security import ANONYMOUS_TENANT, ApiKeys, SecurityConfigError, parse_key_entry, redact_url
from services.common.server import GrpcServer, Service, run_process, serve_until_signal

log = logging.getLogger("gateway")
PROBE_TIMEOUT_S = 2.0


def _grpc_probe(channel):
    stub = health_pb2_grpc.HealthStub(channel)

    async def probe() -> None:
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError("not serving")

    return probe


async def run(config: GatewayConfig) -> None:
    peer_credentials = config.peer_tls.credentials() if config.peer_tls else None
    session_redis = redis_client(config.client_url(config.session_redis_url))
    feature_redis = redis_client(config.client_url(config.feature_cache_url))
    try:  # moves the values in a worker thread; a cluster client connects now, and may fail
        feature_bulk = sync_redis_client(config.client_url(config.feature_cache_url))
    except (RedisError, RedisClusterException, OSError) as exc:
        log.warning("feature cache: no synchronous client (%s: %s); values move on the event loop",
                    type(exc).__name__, exc)
        feature_bulk = None
    if config.stores_share_instance:
        log.warning("sessions and the feature cache share one Redis (%s): its eviction policy applies to both, "
                    "so under LRU features evict sessions and under noeviction features fill it up. Give "
                    "--session-redis-url (noeviction, append-only file) and --feature-cache-url (LRU) their "
                    "own instances (docs/deploy.md)", redact_url(config.session_redis_url))
    for store, client in (("session store", session_redis), ("feature cache", feature_redis)):
        problem = await prepare(client)
        if problem:
            log.warning("%s: the Redis Cluster's slot map could not be loaded yet (%s)", store, problem)
    # One encoder client per target (models may share an encoder pool), one decoder pool per model.
    encoders = {t: EncoderClient(t, credentials=peer_credentials) for t in dict.fromkeys(
        spec.encoder_target for spec in config.model_specs)}
    pools = [DecoderPool(spec.decoder_target, config.routing, credentials=peer_credentials)
             for spec in config.model_specs]
    cache = FeatureCache(feature_redis, config.cache, bulk_client=feature_bulk)
    sessions = SessionStore(session_redis, config.sessions)
    problem = await sessions.policy_problem()
    if problem:
        log.warning("session store %s: %s", redact_url(config.session_redis_url), problem)
    # Quota state lives beside the sessions: the live-session and session-bytes counts must agree with them.
    # One quota table and one set of byte counters for every served model: a tenant's limits are its own,
    # whichever model it calls.
    quotas = TenantQuotas(config.quotas, QuotaStore(session_redis), default_max_new_tokens=config.max_new_tokens,
                          default_ttl_s=config.sessions.default_ttl_s, max_ttl_s=config.sessions.max_ttl_s,
                          tenants=[parse_key_entry(k)[0] for k in config.api_keys] or [ANONYMOUS_TENANT])
    transfer = TransferStats()
    models = ServedModels([
        ServedModel(spec.name, ChatCore(config, encoders[spec.encoder_target], pool, cache, sessions, quotas,
                                        transfer))
        for spec, pool in zip(config.model_specs, pools, strict=True)])
    core = models.default
    for pool in pools:
        await pool.start()
    routing_labels = [(spec.name or "default", pool) for spec, pool in zip(config.model_specs, pools, strict=True)]
    fetcher = MediaFetcher(config.http.media)
    name = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
    if config.insecure_open:
        log.warning("--insecure-open: serving WITHOUT authentication; anyone who reaches %s can use the model",
                    config.server.address)
        keys = None
    else:
        keys = ApiKeys(config.api_keys)
    server = GrpcServer(config.server, [Service(name, gateway_pb2_grpc.add_GatewayServicer_to_server,
                                                GatewayServicer(core, models))],
                        interceptors=[ApiKeyInterceptor(keys)] if keys else [],
                        collectors=[FeatureCacheCollector(lambda: cache), TransferCollector(transfer, lambda: cache),
                                    TenantCollector(lambda: quotas), RoutingCollector(lambda: routing_labels)],
                        unique_request_ids=True)
    http = None
    if config.http.port:
        probes = [*(("vision encoder", _grpc_probe(e.channel)) for e in encoders.values()),
                  *(("language decoder", pool.probe) for pool in pools),
                  ("session store", session_redis.ping)]  # not the feature cache: without it requests still work
        http = HttpServer(create_app(core, config.http, fetcher=fetcher, api_keys=keys, probes=probes,
                                     models=models), config)

    async def start_http() -> None:
        if http is not None:
            await http.start()

    try:
        await serve_until_signal(server, start_http)
    except BaseException:
        await server.stop(now=True)
        raise
    finally:
        if http is not None:
            await http.stop()
        await quotas.drain()  # give back what ended calls reserved before the Redis client closes
        await fetcher.close()
        for encoder in encoders.values():
            await encoder.close()
        for pool in pools:
            await pool.close()
        await session_redis.aclose()
        await feature_redis.aclose()
        cache.close()
        if feature_bulk is not None:
            feature_bulk.close()


def main(argv: list[str] | None = None) -> int:
    config = GatewayConfig.from_args(argv)
    configure_logging(config.log_level, config.log_format)
    log.info("starting gateway: %s", config.summary())
    return run_process("gateway", run(config), (SecurityConfigError,))


if __name__ == "__main__":
    sys.exit(main())
