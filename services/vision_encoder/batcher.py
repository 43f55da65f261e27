"""Dynamic batching: tiles from concurrent requests share one `extract_feature` forward pass.

A ViT forward on one tile leaves an accelerator mostly idle; the same pass over 32 tiles costs
little more. Requests `submit` their `[n, 3, H, W]` pixel values and await `[n, ...]` features. A
single worker coroutine takes up to `max_batch_tiles` queued tiles (an item larger than that is
split across consecutive batches), waits at most `batch_wait_ms` after the oldest tile arrived
for more to join, and runs the forward in one dedicated thread, so the event loop keeps serving
and passes never overlap on the device.

Admission is bounded: tiles queued but not yet computed never exceed `max_queued_tiles`; beyond
that `submit` raises `Overloaded` at once (the servicer answers RESOURCE_EXHAUSTED) rather than
letting latency and memory grow without limit. A request cancelled while waiting drops its
queued tiles.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor], torch.Tensor]


class Overloaded(RuntimeError):
    """The queue is full right now; the caller may retry later (RESOURCE_EXHAUSTED)."""


class TooLarge(ValueError):
    """One submission has more tiles than the queue can ever hold (INVALID_ARGUMENT)."""


class BatcherClosed(RuntimeError):
    """The batcher is shutting down."""


@dataclass(eq=False)
class _Work:
    pixel_values: torch.Tensor
    future: asyncio.Future[torch.Tensor]
    enqueued_at: float
    scheduled: int = 0  # tiles already handed to a forward pass
    parts: list[torch.Tensor] = field(default_factory=list)
    computed: int = 0

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]

    @property
    def pending(self) -> int:
        return self.num_tiles - self.scheduled


@dataclass(frozen=True)
class _Slice:
    work: _Work
    start: int
    stop: int


@dataclass
class BatcherStats:
    """Counters for logs and metrics: how well concurrent requests are being merged."""

    batches: int = 0
    tiles: int = 0
    rejected: int = 0
    failed_batches: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)

    @property
    def mean_batch_tiles(self) -> float:
        return self.tiles / self.batches if self.batches else 0.0


class Batcher:
    def __init__(
        self,
        forward: ForwardFn,
        *,
        max_batch_tiles: int,
        batch_wait_ms: float,
        max_queued_tiles: int,
        on_batch: Callable[[bool], None] = lambda ok: None,
    ):
        if max_batch_tiles < 1 or max_queued_tiles < max_batch_tiles or batch_wait_ms < 0:
            raise ValueError(
                "need max_batch_tiles >= 1, max_queued_tiles >= max_batch_tiles, batch_wait_ms >= 0"
            )
        self._forward = forward
        self._on_batch = on_batch  # told after each forward pass whether it worked (engine health)
        self.max_batch_tiles = max_batch_tiles
        self.batch_wait_s = batch_wait_ms / 1000
        self.max_queued_tiles = max_queued_tiles
        self.stats = BatcherStats()
        self._queue: collections.deque[_Work] = collections.deque()
        self._queued_tiles = 0
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        # One thread: forward passes run one at a time, in submission order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-forward")

    @property
    def queued_tiles(self) -> int:
        """Tiles admitted and not yet handed to a forward pass."""
        return self._queued_tiles

    async def submit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features for `pixel_values` ([n, ...] -> [n, ...]), computed in some shared batch."""
        if self._closed:
            raise BatcherClosed("the encoder is shutting down")
        n = pixel_values.shape[0]
        if n < 1:
            raise ValueError("submit needs at least one tile")
        if n > self.max_queued_tiles:
            raise TooLarge(f"{n} tiles in one request exceed the encoder's limit of {self.max_queued_tiles}")
        if self._queued_tiles + n > self.max_queued_tiles:
            self.stats.rejected += 1
            raise Overloaded(
                f"encoder queue is full ({self._queued_tiles} of {self.max_queued_tiles} tiles queued); "
                "retry later"
            )
        loop = asyncio.get_running_loop()
        work = _Work(pixel_values, loop.create_future(), loop.time())
        work.future.add_done_callback(lambda _: self._on_done(work))
        self._queue.append(work)
        self._queued_tiles += n
        self._arrived.set()
        self._ensure_worker()
        # Cancelling the caller cancels this future; _on_done then drops the queued tiles.
        return await work.future

    async def close(self) -> None:
        """Fail whatever is still queued, stop the worker and its thread."""
        self._closed = True
        for work in list(self._queue):
            if not work.future.done():
                work.future.set_exception(BatcherClosed("the encoder is shutting down"))
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _on_done(self, work: _Work) -> None:
        # Completed, failed or cancelled: any tiles not yet scheduled leave the queue now, so a
        # cancelled request frees its admission budget at once.
        if work.pending and work in self._queue:
            self._queue.remove(work)
            self._queued_tiles -= work.pending

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="encoder-batcher")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # Wait for company, but only until the oldest tile has waited batch_wait_s: tiles
            # that queued up behind a running forward pass go without further delay.
            deadline = self._queue[0].enqueued_at + self.batch_wait_s
            while self._queued_tiles < self.max_batch_tiles and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:  # a distinct class before Python 3.11
                    break
            batch = self._take_batch()
            if batch:
                await self._compute(batch)

    def _take_batch(self) -> list[_Slice]:
        batch: list[_Slice] = []
        room = self.max_batch_tiles
        while room and self._queue:
            work = self._queue[0]
            take = min(room, work.pending)
            batch.append(_Slice(work, work.scheduled, work.scheduled + take))
            work.scheduled += take
            self._queued_tiles -= take
            room -= take
            if not work.pending:
                self._queue.popleft()
        return batch

    async def _compute(self, batch: list[_Slice]) -> None:
        tiles = sum(s.stop - s.start for s in batch)
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self._forward_batch, batch)
        except asyncio.CancelledError:  # close() while this pass runs: nobody will get its result
            self._fail(batch, BatcherClosed("the encoder is shutting down"))
            raise
        except Exception as exc:  # e.g. CUDA OOM: fail this batch's requests, keep serving
            self.stats.failed_batches += 1
            log.exception("encoder forward failed for a batch of %d tiles", tiles)
            self._fail(batch, exc)
            self._on_batch(False)
            return
        self._on_batch(True)
        self.stats.batches += 1
        self.stats.tiles += tiles
        self.stats.batch_sizes[tiles] += 1
        offset = 0
        for s in batch:
            n = s.stop - s.start
            work = s.work
            if not work.future.done():
                work.parts.append(out[offset : offset + n])
                work.computed += n
                if work.computed == work.num_tiles:
                    parts = work.parts
                    work.future.set_result(parts[0] if len(parts) == 1 else torch.cat(parts))
            offset += n

    @staticmethod
    def _fail(batch: list[_Slice], exc: BaseException) -> None:
        for work in {s.work for s in batch}:
            if not work.future.done():
                work.future.set_exception(exc)

    def _forward_batch(self, batch: list[_Slice]) -> torch.Tensor:
        """Runs in the forward thread (inference_mode is per thread, so it is entered here)."""
        with torch.inference_mode():
            if len(batch) == 1:
                s = batch[0]
                pixel_values = s.work.pixel_values[s.start : s.stop]
            else:
                pixel_values = torch.cat([s.work.pixel_values[s.start : s.stop] for s in batch])
            out = self._forward(pixel_values)
        if out.shape[0] != pixel_values.shape[0]:
            raise RuntimeError(f"forward returned {out.shape[0]} rows for {pixel_values.shape[0]} tiles")
        return out
