"""Batcher with a fake forward: merging, routing, splitting, overload, cancellation, failures."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import pytest
import torch

from services.vision_encoder.batcher import Batcher, BatcherClosed, Overloaded, TooLarge


class FakeForward:
    """Doubles its input; records batch sizes; can be held mid-pass by a gate (runs in a thread)."""

    def __init__(self, gated: bool = False, fail_on: float | None = None):
        self.batches: list[torch.Tensor] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not gated:
            self.gate.set()
        self.fail_on = fail_on

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert torch.is_inference_mode_enabled()
        self.batches.append(x.clone())
        self.entered.set()
        if not self.gate.wait(timeout=10):
            raise RuntimeError("test gate never opened")
        if self.fail_on is not None and bool((x == self.fail_on).any()):
            raise RuntimeError("boom")
        return x * 2

    @property
    def sizes(self) -> list[int]:
        return [b.shape[0] for b in self.batches]


def tiles(n: int, value: float) -> torch.Tensor:
    """n tiles, tile i filled with value + i/100, so routing mistakes show up in the values."""
    return torch.stack([torch.full((3, 2, 2), value + i / 100) for i in range(n)])


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=20))


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.001)


def test_concurrent_requests_share_batches_and_get_their_own_results() -> None:
    async def body() -> None:
        fwd = FakeForward()
        batcher = Batcher(fwd, max_batch_tiles=16, batch_wait_ms=200, max_queued_tiles=64)
        inputs = [tiles(2, float(k)) for k in range(8)]
        results = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        for x, y in zip(inputs, results, strict=True):
            torch.testing.assert_close(y, x * 2, rtol=0, atol=0)
        # 16 tiles fill one batch without waiting out the 200 ms.
        assert fwd.sizes == [16]
        assert batcher.stats.batches == 1 and batcher.stats.tiles == 16
        assert batcher.stats.batch_sizes == {16: 1}
        assert batcher.queued_tiles == 0
        await batcher.close()

    run(body)


def test_concurrency_gives_fewer_larger_batches_than_sequential() -> None:
    async def body() -> None:
        seq_fwd, conc_fwd = FakeForward(), FakeForward()
        seq = Batcher(seq_fwd, max_batch_tiles=8, batch_wait_ms=5, max_queued_tiles=64)
        for k in range(6):
            await seq.submit(tiles(1, k))
        conc = Batcher(conc_fwd, max_batch_tiles=8, batch_wait_ms=50, max_queued_tiles=64)
        await asyncio.gather(*(conc.submit(tiles(1, k)) for k in range(6)))
        assert seq_fwd.sizes == [1] * 6
        assert conc_fwd.sizes == [6]
        assert conc.stats.mean_batch_tiles == 6
        await seq.close()
        await conc.close()

    run(body)


def test_item_larger_than_a_batch_is_split_and_reassembled_in_order() -> None:
    async def body() -> None:
        fwd = FakeForward()
        batcher = Batcher(fwd, max_batch_tiles=4, batch_wait_ms=0, max_queued_tiles=16)
        x = tiles(10, 1.0)
        y = await batcher.submit(x)
        torch.testing.assert_close(y, x * 2, rtol=0, atol=0)
        assert fwd.sizes == [4, 4, 2]
        await batcher.close()

    run(body)


def test_split_item_shares_its_last_batch_with_the_next_request() -> None:
    async def body() -> None:
        fwd = FakeForward(gated=True)
        batcher = Batcher(fwd, max_batch_tiles=4, batch_wait_ms=0, max_queued_tiles=32)
        first = asyncio.ensure_future(batcher.submit(tiles(1, 0.0)))
        await until(fwd.entered.is_set)  # the worker is busy: the next items queue up together
        a, b = tiles(6, 1.0), tiles(3, 2.0)
        ta, tb = asyncio.ensure_future(batcher.submit(a)), asyncio.ensure_future(batcher.submit(b))
        await until(lambda: batcher.queued_tiles == 9)
        fwd.gate.set()
        ya, yb = await ta, await tb
        await first
        torch.testing.assert_close(ya, a * 2, rtol=0, atol=0)
        torch.testing.assert_close(yb, b * 2, rtol=0, atol=0)
        assert fwd.sizes == [1, 4, 4, 1]
        await batcher.close()

    run(body)


def test_overload_is_rejected_at_once_and_admitted_work_completes() -> None:
    async def body() -> None:
        fwd = FakeForward(gated=True)
        batcher = Batcher(fwd, max_batch_tiles=4, batch_wait_ms=0, max_queued_tiles=8)
        running = asyncio.ensure_future(batcher.submit(tiles(4, 0.0)))
        await until(fwd.entered.is_set)  # in the forward: no longer counts as queued
        queued = [asyncio.ensure_future(batcher.submit(tiles(4, float(k)))) for k in (1, 2)]
        await until(lambda: batcher.queued_tiles == 8)
        with pytest.raises(Overloaded, match="queue is full"):
            await batcher.submit(tiles(1, 9.0))
        assert batcher.stats.rejected == 1
        with pytest.raises(TooLarge):
            await batcher.submit(tiles(9, 9.0))
        fwd.gate.set()
        await running
        for k, task in zip((1, 2), queued, strict=True):
            torch.testing.assert_close(await task, tiles(4, float(k)) * 2, rtol=0, atol=0)
        # Room again once the queue drained.
        await batcher.submit(tiles(1, 3.0))
        await batcher.close()

    run(body)


def test_cancelled_request_drops_its_queued_tiles() -> None:
    async def body() -> None:
        fwd = FakeForward(gated=True)
        batcher = Batcher(fwd, max_batch_tiles=4, batch_wait_ms=0, max_queued_tiles=8)
        running = asyncio.ensure_future(batcher.submit(tiles(2, 0.0)))
        await until(fwd.entered.is_set)
        doomed = asyncio.ensure_future(batcher.submit(tiles(3, 5.0)))
        kept = asyncio.ensure_future(batcher.submit(tiles(2, 7.0)))
        await until(lambda: batcher.queued_tiles == 5)
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        assert batcher.queued_tiles == 2
        fwd.gate.set()
        await running
        torch.testing.assert_close(await kept, tiles(2, 7.0) * 2, rtol=0, atol=0)
        assert fwd.sizes == [2, 2]
        assert not any(bool((b == 5.0).any()) for b in fwd.batches)
        await batcher.close()

    run(body)


def test_forward_failure_fails_that_batch_only() -> None:
    async def body() -> None:
        fwd = FakeForward(fail_on=13.0)
        batcher = Batcher(fwd, max_batch_tiles=4, batch_wait_ms=0, max_queued_tiles=8)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(tiles(1, 13.0))
        assert batcher.stats.failed_batches == 1
        x = tiles(2, 1.0)
        torch.testing.assert_close(await batcher.submit(x), x * 2, rtol=0, atol=0)
        await batcher.close()

    run(body)


def test_close_fails_queued_work_and_refuses_new_work() -> None:
    async def body() -> None:
        fwd = FakeForward(gated=True)
        batcher = Batcher(fwd, max_batch_tiles=2, batch_wait_ms=0, max_queued_tiles=8)
        running = asyncio.ensure_future(batcher.submit(tiles(2, 0.0)))
        await until(fwd.entered.is_set)
        waiting = asyncio.ensure_future(batcher.submit(tiles(2, 1.0)))
        await until(lambda: batcher.queued_tiles == 2)
        await batcher.close()
        with pytest.raises(BatcherClosed):
            await waiting
        with pytest.raises(BatcherClosed):
            await batcher.submit(tiles(1, 0.0))
        fwd.gate.set()
        await asyncio.gather(running, return_exceptions=True)

    run(body)
