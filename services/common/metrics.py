"""Prometheus metrics: RPC counts and latencies, and collectors that read each service's own state.

Each server has its own registry (tests run several servers in one process) served over HTTP on
`--metrics-port` (0 = off). RPC metrics are recorded by `MonitoringInterceptor`; the service state
(queue depth, active sequences, KV cache use, tokens, batch sizes, cache hits) is read at scrape time
from the objects that already count it, so serving code does no metrics work of its own.

RPC metrics (labels grpc_service, grpc_method; grpc_code where the call has ended):
  ivl_grpc_requests_total, ivl_grpc_request_duration_seconds (histogram), ivl_grpc_requests_in_flight,
  ivl_grpc_first_response_seconds (histogram; streaming responses: time to the first message).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# From a health check to a long generation.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_TILE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class RpcMetrics:
    def __init__(self, registry: CollectorRegistry):
        labels = ("grpc_service", "grpc_method")
        self.requests = Counter("ivl_grpc_requests", "RPCs finished, by status code",
                                (*labels, "grpc_code"), registry=registry)
        self.duration = Histogram("ivl_grpc_request_duration_seconds", "RPC duration, start to status",
                                  (*labels, "grpc_code"), buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("ivl_grpc_requests_in_flight", "RPCs being handled", labels, registry=registry)
        self.first_response = Histogram("ivl_grpc_first_response_seconds",
                                        "Streaming RPCs: time from the call's start to its first response message",
                                        labels, buckets=LATENCY_BUCKETS, registry=registry)


class ServiceMetrics:
    """One server's registry: process metrics, RPC metrics, and any service collectors."""

    def __init__(self, collectors: Iterable[Collector] = ()):
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # memory, CPU, open fds
        self.rpc = RpcMetrics(self.registry)
        for collector in collectors:
            self.registry.register(collector)
        self._http = None

    def serve(self, host: str, port: int) -> int | None:
        """Serve /metrics on host:port (port 0 = off); the bound port, or None.

        Failing to bind logs an error and serving goes on without metrics: an observability problem
        must not take the model down (Prometheus reports the target as down).
        """
        if port == 0:
            return None
        try:
            self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.error("metrics endpoint NOT started: cannot bind %s:%d (%s); serving without metrics",
                      host, port, exc.strerror or exc)
            return None
        bound = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


# ------------------------------------------------------------------------------ service collectors
#
# Each takes a getter because the object it reads exists only once the model is loaded; until then
# it reports nothing. Reads happen on the HTTP server's thread: they only take lengths and integers
# (atomic under the GIL) or copy small dicts.


class _StateCollector(Collector):
    def __init__(self, get: Callable[[], Any]):
        self._get = get

    def collect(self) -> Iterator[Metric]:
        state = self._get()
        if state is not None:
            yield from self._metrics(state)

    def _metrics(self, state: Any) -> Iterator[Metric]:
        raise NotImplementedError


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_, value=value)


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)


class EncoderCollector(_StateCollector):
    """Reads a vision-encoder `Batcher`: queue depth, batch sizes, tiles."""

    def _metrics(self, batcher: Any) -> Iterator[Metric]:
        stats = batcher.stats
        yield _gauge("ivl_encoder_queued_tiles", "Tiles admitted and waiting for a forward pass",
                     batcher.queued_tiles)
        yield _gauge("ivl_encoder_max_queued_tiles", "Queued tiles beyond which requests are refused",
                     batcher.max_queued_tiles)
        sizes = dict(stats.batch_sizes)  # a copy: the event loop may add to it meanwhile
        buckets = [(str(bound), sum(n for size, n in sizes.items() if size <= bound)) for bound in BATCH_TILE_BUCKETS]
        buckets.append(("+Inf", sum(sizes.values())))
        yield HistogramMetricFamily("ivl_encoder_batch_tiles", "Tiles per forward pass", buckets=buckets,
                                    sum_value=sum(size * n for size, n in sizes.items()))
        yield _counter("ivl_encoder_tiles", "Tiles encoded", stats.tiles)
        yield _counter("ivl_encoder_batches", "Forward passes run", stats.batches)
        yield _counter("ivl_encoder_rejected", "Requests refused because the tile queue was full", stats.rejected)
        yield _counter("ivl_encoder_failed_batches", "Forward passes that failed", stats.failed_batches)


class DecoderCollector(_StateCollector):
    """Reads the decoder's `AsyncEngine` (and its `LLMEngine`): sequences, KV cache, tokens."""

    def _metrics(self, async_engine: Any) -> Iterator[Metric]:
        engine = async_engine.engine
        scheduler, blocks, stats = engine.scheduler, engine.block_manager, engine.stats
        yield _gauge("ivl_decoder_active_sequences", "Sequences admitted to the running batch (holding KV blocks)",
                     len(scheduler.running))
        yield _gauge("ivl_decoder_waiting_sequences", "Sequences queued for admission", len(scheduler.waiting))
        yield _gauge("ivl_decoder_max_queued_sequences", "Queue size beyond which requests are refused",
                     engine.config.max_queue_size)
        used = blocks.num_blocks - blocks.num_free_blocks
        yield _gauge("ivl_decoder_kv_cache_blocks", "KV-cache blocks in all", blocks.num_blocks)
        yield _gauge("ivl_decoder_kv_cache_used_blocks", "KV-cache blocks held by live sequences", used)
        yield _gauge("ivl_decoder_kv_cache_usage_ratio", "Fraction of KV-cache blocks held by live sequences",
                     used / blocks.num_blocks)
        yield _counter("ivl_decoder_generated_tokens", "Tokens generated (rate() = tokens/s)",
                       stats.generated_tokens)
        yield _counter("ivl_decoder_prompt_tokens", "Prompt tokens run through the model (recomputes included)",
                       stats.prompt_tokens_computed)
        yield _counter("ivl_decoder_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                       stats.cached_prompt_tokens)
        yield _counter("ivl_decoder_engine_steps", "Engine steps run", stats.steps)
        yield _counter("ivl_decoder_failed_steps", "Engine steps whose model call failed", stats.failed_steps)


_CACHE_COUNTERS = (
    ("hits", "Feature lookups answered from Redis"),
    ("misses", "Feature lookups not in Redis"),
    ("errors", "Redis calls that failed (down, timeout, out of memory)"),
    ("bypassed", "Redis calls skipped while Redis was marked unavailable"),
    ("corrupt", "Cached entries that failed verification and were dropped"),
    ("oversize", "Entries not cached for exceeding the size limit"),
    ("computes", "Features computed by the encoder on a miss"),
    ("coalesced", "Lookups that joined an identical in-flight lookup in this process"),
    ("abandoned", "Lookups (and their encodes) cancelled because every caller had left"),
    ("lock_waits", "Lookups that waited on another replica's compute"),
)


class FeatureCacheCollector(_StateCollector):
    """Reads the gateway's `FeatureCache.stats`."""

    def _metrics(self, cache: Any) -> Iterator[Metric]:
        stats = cache.stats
        for field, help_ in _CACHE_COUNTERS:
            yield _counter(f"ivl_gateway_feature_cache_{field}", help_, getattr(stats, field))
        yield _counter("ivl_gateway_feature_cache_read_bytes", "Bytes of features read from Redis", stats.bytes_read)
        yield _counter("ivl_gateway_feature_cache_written_bytes", "Bytes of features written to Redis",
                       stats.bytes_written)


class TenantCollector(_StateCollector):
    """Reads the gateway's `TenantQuotas`: per tenant (label `tenant`: the API keys' names, or
    `anonymous` on an open gateway, so a bounded set) calls admitted and refused, calls in progress on
    this replica, tokens generated."""

    def _metrics(self, quotas: Any) -> Iterator[Metric]:
        stats = dict(quotas.stats)  # a copy: the event loop may add to it meanwhile
        admitted = CounterMetricFamily("ivl_gateway_tenant_calls", "Chat calls admitted, per tenant", labels=["tenant"])
        in_flight = GaugeMetricFamily("ivl_gateway_tenant_calls_in_progress", "Chat calls in progress on this replica",
                                      labels=["tenant"])
        tokens = CounterMetricFamily("ivl_gateway_tenant_generated_tokens", "Tokens generated, per tenant",
                                     labels=["tenant"])
        refused = CounterMetricFamily("ivl_gateway_quota_refusals", "Calls refused for a quota, per tenant and quota",
                                      labels=["tenant", "quota"])
        for tenant, s in sorted(stats.items()):
            admitted.add_metric([tenant], s.admitted)
            in_flight.add_metric([tenant], s.in_flight)
            tokens.add_metric([tenant], s.generated_tokens)
            for quota, n in sorted(s.refused.items()):
                refused.add_metric([tenant, quota], n)
        yield from (admitted, in_flight, tokens, refused)
        yield _counter("ivl_gateway_quota_store_errors", "Quota checks that could not reach the session Redis "
                       "(the call was admitted without its quota)", quotas.store_errors)
