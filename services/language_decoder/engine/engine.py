"""`LLMEngine`: requests in, and the synchronous step loop (schedule, execute, sample, postprocess, emit)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.language_decoder.models import CausalLM
from services.language_decoder.quantize import quantize_model

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenize import IncrementalDetokenizer, OutputText
from .errors import PromptTooLong
from .request import EngineOutput, EngineRequest, PrefixHold, SamplingParams, Usage
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import NewToken, Scheduler, SchedulerOutput
from .sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Running totals, for metrics and tests."""

    steps: int = 0
    prompt_tokens_computed: int = 0  # prompt tokens run through the model (recomputes included)
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    generated_tokens: int = 0
    failed_steps: int = 0


class LLMEngine:
    """Continuous-batching engine over one language model (`models.CausalLM`) and a paged KV cache.

    Not thread-safe: one thread calls `add_request`, `abort` and `step` (`AsyncEngine` is that thread
    for the servicer). `tokenizer` (an `InternLM2Tokenizer`) enables text deltas and stop strings;
    without it outputs carry token ids only.

    The engine takes over `model`: on CPU it rewrites the model's linear layers in place for faster
    small-batch matmuls (`cpu_weights.use_fast_cpu_linears`; same results up to float rounding), and
    with `compile_layers` it compiles the model's decoder layers.
    """

    def __init__(
        self,
        model: CausalLM,
        config: EngineConfig | None = None,
        tokenizer: object | None = None,
        detokenizer_factory: Callable[[], IncrementalDetokenizer] | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.runner = ModelRunner(quantize_model(model, self.config.quantize), self.config)
        # Cached KV carries the RoPE it was written with; past the rotary's limit (dynamic NTK, Phi-3's
        # long factors) that depends on the whole sequence's length, so reuse is only exact below it.
        prefix_ok = self.runner.rope.position_only
        # Pins never take the blocks one longest sequence needs: the head of the queue always fits.
        self.block_manager = BlockManager(
            self.runner.num_blocks, self.config.block_size, self.config.enable_prefix_caching and prefix_ok,
            max_pinned_blocks=self.runner.num_blocks - self.config.max_blocks_per_seq,
        )
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.sampler = Sampler()
        self.sequences: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self.hidden_size = model.config.hidden_size
        self._arrivals = itertools.count()
        if detokenizer_factory is None and tokenizer is not None:
            from services.language_decoder.tokenizer import IncrementalDecoder

            def detokenizer_factory() -> IncrementalDetokenizer:
                return IncrementalDecoder(tokenizer, skip_special_tokens=True)

        self._detokenizer_factory = detokenizer_factory

    # ------------------------------------------------------------------ requests

    def make_sequence(self, request: EngineRequest) -> Sequence:
        """Validate a request and build its sequence (raises PromptTooLong / ValueError)."""
        n = len(request.prompt_token_ids)
        if n > self.config.max_model_len:
            raise PromptTooLong(
                f"the prompt has {n} tokens; this model serves at most max_model_len="
                f"{self.config.max_model_len} tokens (prompt + generated)"
            )
        embeds = request.image_embeds
        if embeds is not None and embeds.shape[-1] != self.hidden_size:
            raise ValueError(f"image embeddings have width {embeds.shape[-1]}, the model {self.hidden_size}")
        if request.sampling.stop and self._detokenizer_factory is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        hold = request.prefix_hold
        if request.held_images and (hold is None or not set(request.held_images) <= set(hold.held_images)):
            raise ValueError("held images must be covered by the request's prefix_hold")
        if hold is not None and (hold.taken or hold.released):
            raise ValueError("this prefix hold was already used or released")
        seq = Sequence(request, next(self._arrivals), self.config.block_size)
        if self._detokenizer_factory is not None:
            seq.detok = OutputText(self._detokenizer_factory(), request.sampling.stop)
        return seq

    def enqueue(self, seq: Sequence, hold: PrefixHold | None = None) -> None:
        """Queue `seq`; it takes over `hold`'s pinned blocks (released when it finishes)."""
        if seq.request_id in self.sequences:
            raise ValueError(f"request id {seq.request_id!r} is already running")
        if hold is not None and (hold.taken or hold.released):
            raise ValueError("this prefix hold was already used or released")
        self.scheduler.add(seq)  # raises QueueFull
        if hold is not None:
            seq.pinned_blocks, hold.taken = list(hold.blocks), True
        self.sequences[seq.request_id] = seq

    def hold_prefix(self, request: EngineRequest) -> PrefixHold:
        """Pin the cached prefix of `request`'s prompt; say which images it covers completely.

        `request` needs no embeddings (mark every image held) but its final ids, spans, image hashes
        and salt. An image is held when every block up to its last position is cached: its KV, and
        everything before it, is then computed already. Release with `release_hold` unless a request
        carrying the hold (`EngineRequest.prefix_hold`) is queued.
        """
        seq = Sequence(request, -1, self.config.block_size)
        blocks = self.block_manager.pin_prefix(seq)
        cached = len(blocks) * self.config.block_size
        held = tuple(i for i, (_, end) in enumerate(seq.image_spans) if end <= cached)
        return PrefixHold(blocks, held, cached)

    def release_hold(self, hold: PrefixHold) -> None:
        """Unpin a hold no request took over. Idempotent."""
        if not hold.taken and not hold.released:
            hold.released = True
            self.block_manager.unpin(hold.blocks)

    def add_request(self, request: EngineRequest) -> None:
        self.enqueue(self.make_sequence(request), request.prefix_hold)

    def abort(self, request_id: str) -> bool:
        """Drop a request now and free its blocks; False if it is unknown or already finished."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[EngineOutput]:
        """One iteration: schedule, run the model, sample, update the sequences, emit one output per token."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.stats.steps += 1
        try:
            seqs, logits = self.runner.execute(batch.scheduled)
            token_ids = self.sampler(logits, seqs)
        except Exception as exc:  # a failed forward fails its requests, never the engine
            return self._fail(batch, exc)
        self.stats.prompt_tokens_computed += batch.num_prompt_tokens  # recomputes included
        return [self._emit(new) for new in self.scheduler.postprocess(batch, seqs, token_ids)]

    def _emit(self, new: NewToken) -> EngineOutput:
        seq = new.seq
        self.stats.generated_tokens += 1
        if seq.num_output_tokens == 1:
            self.stats.cached_prompt_tokens += seq.num_prefix_hit_tokens or 0
        if new.finish_reason is None:
            return EngineOutput(seq.request_id, [new.token_id], new.text)
        self.sequences.pop(seq.request_id, None)
        return EngineOutput(seq.request_id, [new.token_id], new.text, True, new.finish_reason, self._usage(seq))

    def _fail(self, batch: SchedulerOutput, exc: BaseException) -> list[EngineOutput]:
        log.exception("decoder step failed; dropping %d request(s)", len(batch.scheduled))
        self.stats.failed_steps += 1
        error = f"{type(exc).__name__}: {exc}"
        outputs = []
        for s in batch.scheduled:
            self.sequences.pop(s.seq.request_id, None)
            self.scheduler.finish(s.seq, "error")
            outputs.append(EngineOutput(s.seq.request_id, [], "", True, "error", self._usage(s.seq), error=error))
        return outputs

    @staticmethod
    def _usage(seq: Sequence) -> Usage:
        return Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_prefix_hit_tokens or 0)

    # ------------------------------------------------------------------ conveniences

    def warm_up(self, max_batch: int = 3) -> None:
        """Run throwaway requests so the first real ones do not pay for compilation and graph capture.

        On a GPU with compiled layers the first steps of new shapes compile (about 15 s for InternVL2-8B
        on an H100). Batches of 1..max_batch cover the single-token graph and the dynamic-shape one;
        other CUDA graph buckets are still captured on first use (a fraction of a second each).
        Statistics are reset afterwards, so metrics count real traffic only. Raises RuntimeError if a
        step fails (say, torch.compile finds no C compiler): better no server than one failing every call.
        """
        vocab = self.runner.model.config.vocab_size
        params = SamplingParams(max_new_tokens=3)
        for batch in range(1, max_batch + 1):
            outputs = self.run_until_done(
                EngineRequest(f"__warmup-{batch}-{i}", [(31 * i + j) % (vocab - 1) + 1 for j in range(16 + batch + i)],
                              params)
                for i in range(batch)
            )
            errors = [out.error for outs in outputs.values() for out in outs if out.finish_reason == "error"]
            if errors:
                raise RuntimeError(f"decoder warm-up failed: {errors[0]}")
        self.stats = EngineStats()

    def run_until_done(self, requests: Iterable[EngineRequest] = ()) -> dict[str, list[EngineOutput]]:
        """Add `requests`, step until nothing is left, return every output grouped by request id."""
        outputs: dict[str, list[EngineOutput]] = {}
        for request in requests:
            self.add_request(request)
            outputs[request.request_id] = []
        while self.has_unfinished():
            for out in self.step():
                outputs.setdefault(out.request_id, []).append(out)
        return outputs
