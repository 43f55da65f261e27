"""Runs one scheduled step through the model: packs the batch into one row, then one forward.

The packed row holds one token per decoding sequence first (`prepare_decode`), then each prefill
chunk, with image embedding rows in place of the prompt's `<IMG_CONTEXT>` positions
(`prepare_prefill`); `run` does the forward and returns the logits of the rows that pick a token.
A decode-only step on a GPU replays a CUDA graph instead (`cuda_graphs`). Everything the model needs
is built here; the model sees tensors and an `AttentionContext`, never requests.

What the engine needs of a language model (any `models.CausalLM`: InternLM2, Qwen2, Phi-3, Llama):
`config` (an `LLMConfig`), `device`, `dtype`, `rotary` (a `RotaryEmbedding`), `embed_rows` and
`forward_flat`, and `model.layers` for regional compilation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from services.language_decoder.models import CausalLM, compile_layers
from services.language_decoder.models.layers import AttentionContext

from .attention import FlashAttention, PrefillChunk, SdpaAttention, StepMetadata, flash_available
from .config import EngineConfig
from .cpu_weights import use_fast_cpu_linears
from .kv_cache import PagedKVCache, num_kv_blocks
from .rope import PackedRope
from .scheduler import ScheduledSeq
from .sequence import Sequence


@dataclass
class PackedStep:
    """One step's tokens packed into one row, on the host (filled by `prepare_decode`/`prepare_prefill`)."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)  # in row order: decodes, then prefill chunks
    token_ids: list[int] = field(default_factory=list)
    positions: list[Tensor] = field(default_factory=list)  # pieces of the [N] positions
    slots: list[Tensor] = field(default_factory=list)  # pieces of the [N] cache slots
    decode_context_lens: list[int] = field(default_factory=list)
    decode_block_tables: list[list[int]] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    image_index: list[Tensor] = field(default_factory=list)  # packed rows taking image embedding rows
    image_rows: list[Tensor] = field(default_factory=list)
    sampling: list[Sequence] = field(default_factory=list)  # sequences that pick a token this step
    logit_rows: list[int] = field(default_factory=list)  # their rows in the packed batch

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class ModelRunner:
    def __init__(self, model: CausalLM, config: EngineConfig) -> None:
        self.model = model.eval()
        self.config = config
        self.device = model.device
        self.dtype = model.dtype
        llm = model.config
        if torch.device(config.device).type != self.device.type:
            raise ValueError(f"EngineConfig.device is {config.device!r} but the model is on {self.device}")
        if config.dtype is not None and config.dtype != self.dtype:
            raise ValueError(f"EngineConfig.dtype is {config.dtype} but the model is {self.dtype}")
        if self.device.type == "cpu":  # rewrites the caller's model in place (see cpu_weights)
            use_fast_cpu_linears(model, prepack=config.cpu_prepacked_weights and self.dtype == torch.float32)
        compile_ = config.compile_layers if config.compile_layers is not None else self.device.type == "cuda"
        if compile_:
            compile_layers(model, config.compile_mode)
        self.num_blocks = num_kv_blocks(config, llm, self.dtype, self.device)
        self.kv_cache = PagedKVCache(llm, self.num_blocks, config.block_size, self.dtype, self.device)
        self.block_size = config.block_size
        self.rope = PackedRope(model.rotary, config.max_model_len, self.dtype, self.device)
        self.use_flash = flash_available(config.block_size, self.device)
        self.graphs = None
        if self.device.type == "cuda" and config.use_cuda_graphs and self.rope.decode_table is not None:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.kv_cache, config, use_flash=self.use_flash, rope=self.rope)

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> tuple[list[Sequence], Tensor]:
        """Run the step; returns the sequences that sample and their next-token logits [n, V] (fp32)."""
        decodes = [s for s in batch if s.num_tokens == 1]
        prefills = [s for s in batch if s.num_tokens > 1]
        if not prefills and self.graphs is not None and self.graphs.fits(decodes):
            return [s.seq for s in decodes], self.graphs.run(decodes)
        step = PackedStep()
        self.prepare_decode(step, decodes)
        self.prepare_prefill(step, prefills)
        return step.sampling, self.run(step)

    def prepare_decode(self, step: PackedStep, decodes: list[ScheduledSeq]) -> None:
        """One token per decoding sequence, in plain Python (the per-step hot path at high concurrency)."""
        if not decodes:
            return
        block_size = self.block_size
        positions = [s.start for s in decodes]
        step.scheduled.extend(decodes)
        step.token_ids.extend(s.seq.token_ids[s.start] for s in decodes)
        step.positions.append(torch.tensor(positions, dtype=torch.long))
        step.slots.append(torch.tensor(
            [s.seq.block_table[p // block_size] * block_size + p % block_size
             for s, p in zip(decodes, positions, strict=True)],
            dtype=torch.long,
        ))
        step.decode_context_lens = [p + 1 for p in positions]
        step.decode_block_tables = [s.seq.block_table for s in decodes]
        for row, s in enumerate(decodes):
            if s.emits_token:
                step.sampling.append(s.seq)
                step.logit_rows.append(row)

    def prepare_prefill(self, step: PackedStep, prefills: list[ScheduledSeq]) -> None:
        """Each prefill chunk after the decodes: its tokens, cache slots and image embedding rows."""
        block_size = self.block_size
        row = step.num_tokens
        for s in prefills:
            seq, start, end = s.seq, s.start, s.start + s.num_tokens
            step.scheduled.append(s)
            step.token_ids.extend(seq.token_ids[start:end])
            positions = torch.arange(start, end)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            step.positions.append(positions)
            step.slots.append(table[positions // block_size] * block_size + positions % block_size)
            step.prefills.append(PrefillChunk(row, s.num_tokens, start, seq.block_table))
            for p, rows in seq.image_rows(start, min(end, seq.num_prompt_tokens)):
                step.image_index.append(torch.arange(row + p - start, row + p - start + rows.shape[0]))
                step.image_rows.append(rows)
            if s.emits_token:
                step.sampling.append(seq)
                step.logit_rows.append(row + s.num_tokens - 1)
            row += s.num_tokens

    def run(self, step: PackedStep) -> Tensor:
        """The forward over a packed step: float32 logits [len(step.sampling), V] of its `logit_rows`.

        A step of mid-prompt chunks only fills the cache and returns [0, V].
        """
        dev = self.device
        meta = StepMetadata(
            slot_mapping=torch.cat(step.slots).to(dev, non_blocking=True),
            decode_context_lens=step.decode_context_lens,
            decode_block_tables=step.decode_block_tables,
            prefills=step.prefills,
        )
        kv = (FlashAttention if self.use_flash else SdpaAttention)(self.kv_cache, meta, dev)
        ids = torch.tensor(step.token_ids, dtype=torch.long).to(dev, non_blocking=True)
        if step.image_rows:
            index = torch.cat(step.image_index).to(dev, non_blocking=True)
            embeds = self.model.embed_rows(ids, torch.cat(step.image_rows), index)
        else:
            embeds = self.model.embed_rows(ids)
        cos, sin = self.rope(torch.cat(step.positions).to(dev, non_blocking=True), step.scheduled)
        rows = torch.tensor(step.logit_rows, dtype=torch.long).to(dev, non_blocking=True)
        return self.model.forward_flat(embeds, AttentionContext(cos[None], sin[None], kv=kv), rows)
