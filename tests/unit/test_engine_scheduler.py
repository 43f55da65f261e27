"""Continuous-batching scheduler, as plain Python: no model, a fake step advances the sequences."""

from __future__ import annotations

import pytest

from services.language_decoder.engine.block_manager import BlockManager
from services.language_decoder.engine.config import EngineConfig
from services.language_decoder.engine.errors import QueueFull
from services.language_decoder.engine.request import EngineRequest
from services.language_decoder.engine.scheduler import Scheduler, SchedulerOutput
from services.language_decoder.engine.sequence import Sequence, SequenceStatus

BS = 4
_arrival = iter(range(10**9))


def make(num_blocks: int = 64, **config) -> Scheduler:
    defaults = dict(block_size=BS, num_kv_blocks=num_blocks, max_num_seqs=8, max_num_batched_tokens=16,
                    max_model_len=64, max_queue_size=16)
    cfg = EngineConfig(**{**defaults, **config})
    return Scheduler(cfg, BlockManager(num_blocks, BS))


def seq(n: int, first: int = 0) -> Sequence:
    a = next(_arrival)
    return Sequence(EngineRequest(f"r{a}", [first + i % 50 + 3 for i in range(n)]), a, BS)


def fake_step(sched: Scheduler) -> SchedulerOutput:
    """What the engine does after the model ran: advance, publish blocks, append sampled tokens."""
    out = sched.schedule()
    for s in out.scheduled:
        s.seq.num_computed_tokens += s.num_tokens
        sched.block_manager.register_computed(s.seq)
    for s in out.scheduled:
        if s.emits_token:
            s.seq.append_token(7)
    return out


def counts(out: SchedulerOutput) -> dict[str, int]:
    return {s.seq.request_id: s.num_tokens for s in out.scheduled}


def test_queue_is_bounded() -> None:
    sched = make(max_queue_size=2)
    sched.add(seq(4))
    sched.add(seq(4))
    with pytest.raises(QueueFull):
        sched.add(seq(4))


def test_prompt_prefilled_then_one_token_per_step() -> None:
    sched = make()
    a = seq(10)
    sched.add(a)
    out = fake_step(sched)
    assert counts(out) == {a.request_id: 10} and out.scheduled[0].emits_token
    for _ in range(3):
        out = fake_step(sched)
        assert counts(out) == {a.request_id: 1} and out.scheduled[0].emits_token
    assert a.num_tokens == 14 and a.num_computed_tokens == 13


def test_long_prompt_is_chunked_while_decodes_advance_every_step() -> None:
    sched = make(max_num_batched_tokens=16)
    short = [seq(3) for _ in range(3)]
    for s in short:
        sched.add(s)
    fake_step(sched)  # the three short prompts
    long = seq(60, first=1)
    sched.add(long)
    steps = 0
    while long.num_output_tokens == 0:
        out = fake_step(sched)
        steps += 1
        c = counts(out)
        assert all(c[s.request_id] == 1 for s in short), "a decode was stalled by the long prefill"
        assert out.num_tokens <= 16
        assert out.scheduled[-1].seq is long  # decodes first, the chunk last
        assert out.scheduled[-1].emits_token == (long.num_computed_tokens == 60)
    assert steps == 5  # 60 tokens in chunks of 16 - 3 decodes = 13


def test_admission_waits_for_free_blocks() -> None:
    sched = make(num_blocks=16, max_model_len=40)
    a, b = seq(40), seq(30)  # 10 + 8 blocks > 16
    sched.add(a)
    sched.add(b)
    fake_step(sched)  # budget 16: a gets its first chunk; b does not fit in memory
    fake_step(sched)
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    sched.finish(a, "stop")
    fake_step(sched)
    assert b.status is SequenceStatus.RUNNING


def test_running_batch_is_bounded_by_max_num_seqs() -> None:
    sched = make(max_num_seqs=2, max_num_batched_tokens=16)
    seqs = [seq(2) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    out = fake_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_preemption_recomputes_newest_and_keeps_arrival_order() -> None:
    sched = make(num_blocks=6, max_num_batched_tokens=16, max_model_len=24)
    old, new = seq(8), seq(8, first=20)  # 2 blocks each; 2 blocks of headroom
    sched.add(old)
    sched.add(new)
    fake_step(sched)
    preempted = []
    while not preempted:
        out = fake_step(sched)
        preempted = out.preempted
        sched.block_manager.check_invariants(sched.running)
    assert preempted == [new] and new.status is SequenceStatus.WAITING
    assert new.num_computed_tokens == 0 and new.block_table == [] and sched.waiting[0] is new
    assert [s.seq for s in out.scheduled] == [old]  # the old one kept decoding in the same step
    outputs_before = new.output_token_ids
    sched.finish(old, "length")
    out = fake_step(sched)
    # Readmitted: its full blocks are still cached; it recomputes the rest, prompt and outputs alike.
    assert new.status is SequenceStatus.RUNNING and new.output_token_ids[: len(outputs_before)] == outputs_before
    assert new.num_prefix_hit_tokens == 0  # usage reports the first admission's hit only
    assert counts(out)[new.request_id] < new.num_tokens
    assert sched.num_preemptions == 1


def test_a_lone_sequence_that_outgrows_memory_preempts_itself() -> None:
    sched = make(num_blocks=2, max_num_batched_tokens=16, max_model_len=8)
    a = seq(8)  # exactly 2 blocks; the first generated token needs a third
    sched.add(a)
    fake_step(sched)
    out = fake_step(sched)
    assert out.preempted == [a] and out.scheduled == []
    assert sched.block_manager.num_free_blocks == 2
    sched.finish(a, "length")  # the engine ends it: it can never fit
    b = seq(8, first=20)
    sched.add(b)
    fake_step(sched)
    assert fake_step(sched).preempted == [b]
    assert sched.num_preemptions == 2  # every preemption is counted


def test_finish_frees_blocks_wherever_the_sequence_is() -> None:
    sched = make(max_num_seqs=1)
    a, b = seq(5), seq(5)
    sched.add(a)
    sched.add(b)
    fake_step(sched)
    sched.finish(b, "abort")  # still waiting
    sched.finish(a, "abort")  # running
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 64
    assert a.finish_reason == b.finish_reason == "abort"


def test_config_rejects_a_budget_below_one_decode_per_sequence() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=32)


def test_watermark_holds_back_admission_only_while_others_run() -> None:
    sched = make(num_blocks=16, max_model_len=64, watermark_blocks=8)
    a = seq(40)  # 10 blocks: more than 16 - 8, admitted anyway because nothing else runs
    sched.add(a)
    fake_step(sched)
    assert a.status is SequenceStatus.RUNNING
    b = seq(4)  # 1 block, but only 6 are free and 8 are kept back for running decodes
    sched.add(b)
    fake_step(sched)
    assert b.status is SequenceStatus.WAITING


def test_full_queue_message_names_the_limit() -> None:
    sched = make(max_queue_size=1)
    sched.add(seq(4))
    with pytest.raises(QueueFull, match=r"^the decoder queue is full \(1 requests waiting\)$"):
        sched.add(seq(4))


def test_has_unfinished_while_anything_waits_or_runs() -> None:
    sched = make()
    assert not sched.has_unfinished()
    a = seq(4)
    sched.add(a)
    assert sched.has_unfinished()  # waiting only
    fake_step(sched)
    assert sched.running == [a] and not sched.waiting and sched.has_unfinished()  # running only
    sched.finish(a, "stop")
    assert a.status is SequenceStatus.FINISHED and a.finish_reason == "stop"
    assert not sched.has_unfinished()


def test_admissions_share_one_token_budget() -> None:
    sched = make(max_num_batched_tokens=16)
    a, b, c = seq(6), seq(6, 1), seq(6, 2)
    for s in (a, b, c):
        sched.add(s)
    out = fake_step(sched)
    assert counts(out) == {a.request_id: 6, b.request_id: 6, c.request_id: 4}  # c's prompt is chunked
    assert out.num_tokens == 16


def test_a_two_token_prefill_remainder_is_scheduled() -> None:
    sched = make(max_num_batched_tokens=16)
    a = seq(18)
    sched.add(a)
    assert counts(fake_step(sched)) == {a.request_id: 16}
    assert counts(fake_step(sched)) == {a.request_id: 2}


def test_watermark_holds_blocks_back_only_while_something_runs() -> None:
    sched = make(num_blocks=6, watermark_blocks=2)
    a = seq(8)  # 2 blocks
    sched.add(a)
    fake_step(sched)
    b = seq(9, 1)  # 3 blocks: 4 are free, but 2 of them are the running decode's reserve
    sched.add(b)
    out = fake_step(sched)
    assert counts(out) == {a.request_id: 1} and sched.waiting[0] is b
    sched.finish(a, "stop")
    assert counts(fake_step(sched)) == {b.request_id: 9}  # nothing runs: no reserve


def test_the_last_token_of_the_budget_still_admits_a_chunk() -> None:
    sched = make(max_num_batched_tokens=16)
    a, b = seq(15), seq(5, 1)
    sched.add(a)
    sched.add(b)
    assert counts(fake_step(sched)) == {a.request_id: 15, b.request_id: 1}
