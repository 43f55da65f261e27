"""Continuous batching: which sequences run in the next step and how many tokens each
(`schedule`), and what the step's new tokens do to them (`postprocess`).

Every step carries one decode token for each running sequence that is caught up, then prefill
chunks (of running sequences mid-prompt, then of newly admitted ones) until `max_num_batched_tokens`
is used up, so a long prompt is spread over several steps while decodes keep advancing every step.
Admission is first come, first served and needs KV blocks for the whole prompt. When a decode needs
a new block and none is free, the most recently arrived running sequence is preempted: its blocks
are freed and it goes back to the head of the queue, to be recomputed later (prefix reuse usually
finds most of its blocks still cached). After the model ran, `postprocess` advances every scheduled
sequence, publishes its computed blocks to the prefix cache, appends the sampled tokens with their
text, and finishes (freeing the blocks of) each sequence that hit a stop token, a stop string or a
length limit. Plain Python: no tensors here.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .errors import QueueFull
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # first token position fed this step (= num_computed_tokens when scheduled)
    num_tokens: int
    # The step reaches the sequence's last token, so its logits pick the next one; False for a
    # prefill chunk that stops mid-prompt.
    emits_token: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "emits_token", self.start + self.num_tokens == self.seq.num_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        """How many of this step's tokens are prompt tokens (a recompute after preemption also feeds
        generated ones)."""
        return max(0, min(self.num_tokens, self.seq.num_prompt_tokens - self.start))


@dataclass(frozen=True)
class NewToken:
    """One sampled token after `Scheduler.postprocess`: already appended to `seq`."""

    seq: Sequence
    token_id: int
    text: str  # the text delta it completed ("" without a detokenizer or when held back)
    finish_reason: str | None  # "stop" or "length" when it ended the sequence (its blocks are freed)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefill chunks
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(s.num_prompt_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in arrival order: the oldest has priority
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_queue_size:
            raise QueueFull(f"the decoder queue is full ({self.config.max_queue_size} requests waiting)")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        decoding = [s for s in self.running if s.num_pending_tokens == 1]
        prefilling = [s for s in self.running if s.num_pending_tokens > 1]
        for seq in decoding + prefilling:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_pending_tokens, budget)
            if n == 0:
                break
            if not self._make_room(seq, out):
                continue  # the sequence preempted itself
            self.block_manager.append_slots(seq)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n

        # New work waits while memory is short: admitting it would only be preempted again.
        while self.waiting and budget > 0 and not out.preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            # The watermark only protects running decodes: with nothing running, any sequence fits.
            reserve = self.config.watermark_blocks if self.running else 0
            if not self.block_manager.can_allocate(seq, reserve=reserve):
                break
            cached = self.block_manager.allocate(seq)
            seq.num_computed_tokens = cached
            if seq.num_prefix_hit_tokens is None:
                seq.num_prefix_hit_tokens = cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            n = min(seq.num_pending_tokens, budget)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        return out

    def _make_room(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Free blocks for `seq` by preempting the newest sequences; False if `seq` itself went."""
        while not self.block_manager.can_append(seq):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)  # victims go newest first, so the queue keeps arrival order
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove `seq` wherever it is and free its blocks (finish, abort or error)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        self.block_manager.unpin(seq.pinned_blocks)  # a preempted sequence kept them to readmit
        seq.pinned_blocks = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def postprocess(self, batch: SchedulerOutput, seqs: list[Sequence], token_ids: list[int]) -> list[NewToken]:
        """Apply a step that ran: `seqs` (in row order) sampled `token_ids`; see the module doc."""
        for s in batch.scheduled:
            s.seq.num_computed_tokens += s.num_tokens
            self.block_manager.register_computed(s.seq)
        return [self._append(seq, token) for seq, token in zip(seqs, token_ids, strict=True)]

    def _append(self, seq: Sequence, token: int) -> NewToken:
        seq.append_token(token)
        params, text, reason, stop_string = seq.sampling, "", None, False
        if token in params.stop_token_ids:
            reason = "stop"  # the stop token's own text is not part of the response
        elif seq.detok is not None:
            text, stop_string = seq.detok.push(token)
            reason = "stop" if stop_string else None
        if reason is None and (
            seq.num_output_tokens >= params.max_new_tokens or seq.num_tokens >= self.config.max_model_len
        ):
            reason = "length"
        if reason is not None:
            if seq.detok is not None and not stop_string:  # nothing after a stop string is ever sent
                text += seq.detok.finish()
            self.finish(seq, reason)
        return NewToken(seq, token, text, reason)
