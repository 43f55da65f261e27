"""What the decoder's Generate calls moved: embedding bytes received, and bytes a lazy-images client
did not have to send because the prefix cache held those images' KV (decoder.proto, NeedImages).

Plain counters, read at scrape time by `TransferCollector` (Prometheus `ivl_decoder_embedding_*`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass
class TransferStats:
    received_bytes: int = 0  # embedding bytes read from Generate streams
    held_bytes: int = 0  # bytes of images whose KV was held (lazy-images calls): never sent
    received_images: int = 0
    held_images: int = 0
    lazy_requests: int = 0  # Generate calls that asked for lazy images

    @staticmethod
    def held(images: Sequence[Any], held: Iterable[int]) -> int:
        """Bytes the held images' descriptors announce."""
        return sum(images[i].tensor.byte_length for i in held)

    def record(self, images: Sequence[Any], received: Collection[int], held: Collection[int]) -> None:
        """One request read: `images` its descriptors, `received`/`held` indices into them."""
        self.received_bytes += sum(images[i].tensor.byte_length for i in received)
        self.held_bytes += self.held(images, held)
        self.received_images += len(received)
        self.held_images += len(held)


class TransferCollector(Collector):
    """Reads a servicer's `TransferStats`."""

    def __init__(self, stats: TransferStats):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        yield CounterMetricFamily("ivl_decoder_embedding_received_bytes",
                                  "Image embedding bytes received in Generate calls", value=s.received_bytes)
        yield CounterMetricFamily("ivl_decoder_embedding_held_bytes",
                                  "Image embedding bytes not sent because the prefix cache held the images' KV",
                                  value=s.held_bytes)
        yield CounterMetricFamily("ivl_decoder_embedding_received_images", "Images whose embeddings were received",
                                  value=s.received_images)
        yield CounterMetricFamily("ivl_decoder_embedding_held_images",
                                  "Images served from pinned prefix-cache KV without their embeddings",
                                  value=s.held_images)
        yield CounterMetricFamily("ivl_decoder_lazy_image_requests", "Generate calls in the lazy-images conversation",
                                  value=s.lazy_requests)
