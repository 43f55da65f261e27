"""An encode nobody waits for any more is cancelled (FeatureCache.get_or_compute against a real Redis).

The single-flight shields the shared work from any one caller's cancellation, but once the last caller
has left, the work (in the gateway: the encoder call) is cancelled rather than left to run.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_feature_cache_with_redis import ScriptedCompute, new_key, open_cache, run, until


class CancellableCompute(ScriptedCompute):
    """A gated compute that records whether it was cancelled while it waited."""

    def __init__(self) -> None:
        super().__init__(gated=True)
        self.cancelled = asyncio.Event()

    async def __call__(self):
        try:
            return await super().__call__()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def test_the_compute_is_cancelled_when_every_caller_has_left(redis_url):
    async def scenario():
        async with open_cache(redis_url) as cache:
            key, compute = new_key(), CancellableCompute()
            callers = [asyncio.ensure_future(cache.get_or_compute(key, compute)) for _ in range(2)]
            await until(lambda: compute.calls == 1 and cache.stats.coalesced == 1)
            for i, caller in enumerate(callers):
                caller.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await caller  # its cancellation has run to the end
                if i == 0:  # another caller still waits: the shared work goes on
                    assert not compute.cancelled.is_set() and cache.stats.abandoned == 0
            await asyncio.wait_for(compute.cancelled.wait(), 5)
            await until(lambda: not cache._inflight)
            assert cache.stats.abandoned == 1 and await cache.get(key) is None
            again = ScriptedCompute()  # the key is free: a new caller computes afresh
            entry, hit = await cache.get_or_compute(key, again)
            assert not hit and again.calls == 1 and entry == again.entry

    run(scenario())
