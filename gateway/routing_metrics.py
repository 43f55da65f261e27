"""Prometheus view of decoder routing: decisions by outcome, and each replica's load as this gateway
sees it (its last GetLoad report and this gateway's own open calls). Read at scrape time from the
pools (gateway/decoder_pool.py). Labels stay bounded: the served model names and the replicas'
addresses (those the target resolves to now; a replica gone from DNS leaves the gauges).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.decoder_pool import DecoderPool
from gateway.router import Outcome


class RoutingCollector(Collector):
    def __init__(self, get_pools: Callable[[], Sequence[tuple[str, DecoderPool]]]):
        self._get_pools = get_pools  # (model label, its pool)

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily("ivl_gateway_routing_decisions",
                                        "Turns routed to a decoder replica, by how the replica was chosen",
                                        labels=("model", "outcome"))
        labels = ("model", "replica")
        healthy = GaugeMetricFamily("ivl_gateway_decoder_replica_healthy",
                                    "1 while the replica's last load poll succeeded", labels=labels)
        in_flight = GaugeMetricFamily("ivl_gateway_decoder_replica_in_flight",
                                      "Generate calls this gateway has open to the replica", labels=labels)
        running = GaugeMetricFamily("ivl_gateway_decoder_replica_running_sequences",
                                    "Running sequences the replica last reported", labels=labels)
        waiting = GaugeMetricFamily("ivl_gateway_decoder_replica_waiting_sequences",
                                    "Queued sequences the replica last reported", labels=labels)
        kv = GaugeMetricFamily("ivl_gateway_decoder_replica_kv_cache_usage_ratio",
                               "Fraction of the replica's KV-cache blocks in use, as last reported", labels=labels)
        for model, pool in self._get_pools():
            counts = dict(pool.stats.decisions)  # a copy: the event loop may add meanwhile
            for outcome in Outcome:
                decisions.add_metric((model, outcome.value), counts.get(outcome, 0))
            for replica in list(pool.replicas.values()):
                key = (model, replica.address)
                healthy.add_metric(key, 1.0 if replica.healthy else 0.0)
                in_flight.add_metric(key, replica.in_flight)
                report = replica.report
                if report is not None:
                    running.add_metric(key, report.running_sequences)
                    waiting.add_metric(key, report.waiting_sequences)
                    kv.add_metric(key, report.kv_blocks_used / report.kv_blocks_total if report.kv_blocks_total
                                  else 0.0)
        yield from (decisions, healthy, in_flight, running, waiting, kv)
