"""`AsyncEngine`: streaming from a background engine thread, cancellation, queue limits, failures."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.language_decoder.engine import (
    AsyncEngine,
    EngineClosed,
    PromptTooLong,
    QueueFull,
    RequestFailed,
)
from tests.engine_support import reference_greedy, request, tiny_engine, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.002)


def test_concurrent_streams_match_the_reference(model) -> None:
    engine = AsyncEngine(tiny_engine(model))
    prompts = [[5 + i, 17, 23 + i, 8] * (i + 1) for i in range(6)]

    async def one(i: int):
        outs = [o async for o in engine.generate(request(f"r{i}", prompts[i], max_new_tokens=9))]
        return outs

    async def main():
        return await asyncio.gather(*(one(i) for i in range(6)))

    try:
        results = run(main())
    finally:
        engine.close()
    for i, outs in enumerate(results):
        assert [t for o in outs for t in o.token_ids] == reference_greedy(model, prompts[i], 9)
        assert all(not o.finished for o in outs[:-1]) and outs[-1].finished
        assert outs[-1].finish_reason == "length" and outs[-1].usage.completion_tokens == 9


def test_cancelled_stream_is_aborted_within_one_step(model) -> None:
    llm = tiny_engine(model, max_model_len=2048)
    engine = AsyncEngine(llm)
    bm = llm.block_manager
    abort_at: list[int] = []
    abort = llm.abort

    def recording_abort(rid: str) -> bool:
        abort_at.append(llm.stats.steps)
        return abort(rid)

    llm.abort = recording_abort

    async def main():
        gen = engine.generate(request("long", list(range(3, 40)), max_new_tokens=2000))
        seen = 0
        async for _ in gen:
            seen += 1
            if seen == 3:
                break
        steps_when_closed = llm.stats.steps
        await gen.aclose()  # what a cancelled gRPC call or an expired deadline does
        await wait_until(lambda: not llm.sequences)
        return steps_when_closed

    try:
        steps_when_closed = run(main())
    finally:
        engine.close()
    assert abort_at and abort_at[0] - steps_when_closed <= 1
    assert bm.num_free_blocks == bm.num_blocks
    assert llm.stats.generated_tokens < 2000


def test_cancelling_the_consumer_task_aborts(model) -> None:
    llm = tiny_engine(model)
    engine = AsyncEngine(llm)

    async def consume():
        async for _ in engine.generate(request("c", list(range(3, 20)), max_new_tokens=500)):
            await asyncio.sleep(0)

    async def main():
        task = asyncio.create_task(consume())
        await wait_until(lambda: llm.stats.generated_tokens >= 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: not llm.sequences and not llm.has_unfinished())

    try:
        run(main())
    finally:
        engine.close()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_queue_full_and_prompt_too_long_are_raised_to_the_caller(model) -> None:
    llm = tiny_engine(model, max_num_seqs=1, max_queue_size=1, max_model_len=2048)
    engine = AsyncEngine(llm)

    async def main():
        with pytest.raises(PromptTooLong):
            async for _ in engine.generate(request("big", [5] * 2049)):
                pass
        first = engine.generate(request("a", [5, 6, 7], max_new_tokens=2000))
        await first.__anext__()  # "a" runs: the only running slot is taken
        second = asyncio.create_task(
            _drain(engine.generate(request("b", [5, 6, 8], max_new_tokens=2)))
        )
        await wait_until(lambda: len(llm.scheduler.waiting) == 1)  # "b" waits in the queue
        with pytest.raises(QueueFull):
            async for _ in engine.generate(request("c", [5, 6, 9])):
                pass
        await first.aclose()
        return await second

    try:
        outs = run(main())
    finally:
        engine.close()
    assert outs[-1].finished and len([t for o in outs for t in o.token_ids]) == 2


async def _drain(agen):
    return [o async for o in agen]


def test_failed_step_raises_request_failed_and_frees_blocks(model) -> None:
    llm = tiny_engine(model)
    engine = AsyncEngine(llm)

    def broken(batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    llm.runner.execute = broken

    async def main():
        with pytest.raises(RequestFailed, match="illegal memory access"):
            async for _ in engine.generate(request("x", [5, 6, 7])):
                pass

    try:
        run(main())
    finally:
        engine.close()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_close_fails_pending_streams(model) -> None:
    llm = tiny_engine(model, max_model_len=2048)
    engine = AsyncEngine(llm)

    async def main():
        gen = engine.generate(request("x", [5, 6, 7], max_new_tokens=2000))
        await gen.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        with pytest.raises(EngineClosed):
            async for _ in gen:
                pass
        with pytest.raises(EngineClosed):
            async for _ in engine.generate(request("y", [5])):
                pass

    run(main())
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_a_request_id_can_be_reused_right_after_its_stream_closed(model) -> None:
    llm = tiny_engine(model, max_model_len=2048)
    engine = AsyncEngine(llm)

    async def main():
        first = engine.generate(request("same", [5, 6, 7], max_new_tokens=2000))
        await first.__anext__()
        await first.aclose()
        return [o async for o in engine.generate(request("same", [5, 6, 7], max_new_tokens=3))]

    try:
        outs = run(main())
    finally:
        engine.close()
    assert [t for o in outs for t in o.token_ids] == reference_greedy(model, [5, 6, 7], 3)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
