"""Embedding bytes the gateway moved, per hop: counters for Prometheus (`ivl_gateway_embedding_*`).

Hops: `encoder` (features received from the vision encoder), `feature_cache` (read from and written
to Redis: the FeatureCache's own counters), `decoder` (sent in Generate calls, and skipped because the
decoder held those images' KV: the lazy-images conversation, decoder.proto).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass
class TransferStats:
    decoder_sent_bytes: int = 0
    decoder_skipped_bytes: int = 0  # held by the decoder: never read, never sent
    decoder_sent_images: int = 0
    decoder_skipped_images: int = 0
    encoder_received_bytes: int = 0


class TransferCollector(Collector):
    """Reads the core's `TransferStats` and its feature cache's byte counters."""

    def __init__(self, stats: TransferStats, cache: Callable[[], Any]):
        self._stats = stats
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        s, cache = self._stats, self._cache()
        received = CounterMetricFamily("ivl_gateway_embedding_received_bytes",
                                       "Image embedding bytes the gateway received, by hop", labels=["hop"])
        received.add_metric(["encoder"], s.encoder_received_bytes)
        sent = CounterMetricFamily("ivl_gateway_embedding_sent_bytes",
                                   "Image embedding bytes the gateway sent, by hop", labels=["hop"])
        sent.add_metric(["decoder"], s.decoder_sent_bytes)
        if cache is not None:
            received.add_metric(["feature_cache"], cache.stats.bytes_read)
            sent.add_metric(["feature_cache"], cache.stats.bytes_written)
        skipped = CounterMetricFamily("ivl_gateway_embedding_skipped_bytes",
                                      "Image embedding bytes not sent because the receiver held them, by hop",
                                      labels=["hop"])
        skipped.add_metric(["decoder"], s.decoder_skipped_bytes)
        images = CounterMetricFamily("ivl_gateway_decoder_images", "Images of decoder calls, by whether their "
                                     "embeddings were sent or held by the decoder", labels=["outcome"])
        images.add_metric(["sent"], s.decoder_sent_images)
        images.add_metric(["skipped"], s.decoder_skipped_images)
        yield from (received, sent, skipped, images)
