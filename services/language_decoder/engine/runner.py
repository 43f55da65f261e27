"""Runs one scheduled step through the model: packs the batch, attends over the paged cache.

The packed row holds one token per decoding sequence first, then each prefill chunk (with image
embedding rows in place of the prompt's `<IMG_CONTEXT>` positions). Everything the model needs is
built here; the model sees tensors and a `KVStore`, never requests.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.language_decoder.model import InternLM2ForCausalLM, compile_layers

from .attention import FlashAttention, PrefillChunk, SdpaAttention, StepMetadata, flash_available
from .config import EngineConfig
from .kv_cache import PagedKVCache, num_kv_blocks
from .scheduler import ScheduledSeq
from .sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: InternLM2ForCausalLM, config: EngineConfig) -> None:
        self.model = model.eval()
        self.config = config
        self.device = model.device
        self.dtype = model.dtype
        llm = model.config
        if torch.device(config.device).type != self.device.type:
            raise ValueError(f"EngineConfig.device is {config.device!r} but the model is on {self.device}")
        if config.dtype is not None and config.dtype != self.dtype:
            raise ValueError(f"EngineConfig.dtype is {config.dtype} but the model is {self.dtype}")
        if self.device.type == "cpu":
            kmajor_linear_weights(model)
            if config.cpu_prepacked_weights and self.dtype == torch.float32:
                prepack_linear_weights(model)
        compile_ = config.compile_layers if config.compile_layers is not None else self.device.type == "cuda"
        if compile_:
            compile_layers(model, config.compile_mode)
        self.num_blocks = num_kv_blocks(config, llm, self.dtype, self.device)
        self.kv_cache = PagedKVCache(llm, self.num_blocks, config.block_size, self.dtype, self.device)
        self.block_size = config.block_size
        rope = llm.rope_scaling
        # Dynamic NTK rescales RoPE once a sequence outgrows the table; only then is RoPE per sequence.
        self.rope_limit = (
            llm.max_position_embeddings if rope is not None and rope.type == "dynamic" else None
        )
        self.use_flash = flash_available(config.block_size, self.device)
        self.graphs = None
        rope_static = self.rope_limit is None or config.max_model_len <= self.rope_limit
        # Below the dynamic-NTK threshold RoPE depends on the position only: one table, looked up per
        # step (the same fp32 expressions as the model's, so the same values).
        self._rope_table = None
        if rope_static:
            with torch.inference_mode():
                cos, sin = model.rotary(torch.arange(config.max_model_len, device=self.device)[None], 0, self.dtype)
            self._rope_table = (cos[0], sin[0])
        if self.device.type == "cuda" and config.use_cuda_graphs and rope_static:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.kv_cache, config, use_flash=self.use_flash)

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> tuple[list[Sequence], Tensor]:
        """Run the step; returns the sequences that sample and their next-token logits [n, V] (fp32)."""
        decodes = [s for s in batch if s.num_tokens == 1]
        prefills = [s for s in batch if s.num_tokens > 1]
        if not prefills and self.graphs is not None and self.graphs.fits(decodes):
            return [s.seq for s in decodes], self.graphs.run(decodes)

        bs = self.block_size
        ids: list[int] = []
        positions: list[Tensor] = []
        slots: list[Tensor] = []
        sampling: list[Sequence] = []
        logit_rows: list[int] = []

        # Decodes: one token each, plain Python (this is the per-step hot path at high concurrency).
        dec_pos = [s.start for s in decodes]
        ids.extend(s.seq.token_ids[s.start] for s in decodes)
        dec_slots = [s.seq.block_table[p // bs] * bs + p % bs for s, p in zip(decodes, dec_pos, strict=True)]
        if decodes:
            positions.append(torch.tensor(dec_pos, dtype=torch.long))
            slots.append(torch.tensor(dec_slots, dtype=torch.long))
        for i, s in enumerate(decodes):
            if s.samples:
                sampling.append(s.seq)
                logit_rows.append(i)

        chunks: list[PrefillChunk] = []
        image_index: list[Tensor] = []
        image_rows: list[Tensor] = []
        row = len(decodes)
        for s in prefills:
            seq, start, end = s.seq, s.start, s.start + s.num_tokens
            ids.extend(seq.token_ids[start:end])
            pos = torch.arange(start, end)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            chunks.append(PrefillChunk(row, s.num_tokens, start, seq.block_table))
            for p, rows in seq.image_rows(start, min(end, seq.num_prompt_tokens)):
                image_index.append(torch.arange(row + p - start, row + p - start + rows.shape[0]))
                image_rows.append(rows)
            if s.samples:
                sampling.append(seq)
                logit_rows.append(row + s.num_tokens - 1)
            row += s.num_tokens
        rope_lens = [_rope_len(s) for s in decodes + prefills]

        dev = self.device
        meta = StepMetadata(
            slot_mapping=torch.cat(slots).to(dev, non_blocking=True),
            decode_context_lens=[p + 1 for p in dec_pos],
            decode_block_tables=[s.seq.block_table for s in decodes],
            prefills=chunks,
        )
        kv = (FlashAttention if self.use_flash else SdpaAttention)(self.kv_cache, meta, dev)
        pos_all = torch.cat(positions)
        embeds = self.model.model.tok_embeddings(torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True))
        if image_rows:
            index = torch.cat(image_index).to(dev, non_blocking=True)
            embeds.index_copy_(0, index, torch.cat(image_rows).to(dev, embeds.dtype, non_blocking=True))
        cos, sin = self._rotary(pos_all, [len(decodes)] + [s.num_tokens for s in prefills], rope_lens)
        if not sampling:  # only mid-prompt chunks: the cache is filled, nothing to sample
            self.model.forward_flat(embeds, cos, sin, kv, torch.empty(0, dtype=torch.long, device=dev))
            return [], torch.empty(0, self.model.config.vocab_size, device=dev)
        rows_t = torch.tensor(logit_rows, dtype=torch.long).to(dev, non_blocking=True)
        return sampling, self.model.forward_flat(embeds, cos, sin, kv, rows_t)

    def _rotary(self, positions: Tensor, piece_lens: list[int], rope_lens: list[int]) -> tuple[Tensor, Tensor]:
        """cos/sin [N, head_dim]; per piece only when a sequence is past the dynamic-NTK threshold.

        A decode token sees `past + 1` keys; a prefill chunk uses the full prompt length, as upstream
        prefills the whole prompt in one forward (so chunking never changes RoPE).
        """
        pos = positions.to(self.device, non_blocking=True)
        if self._rope_table is not None:
            cos, sin = self._rope_table
            return cos.index_select(0, pos), sin.index_select(0, pos)
        rotary = self.model.rotary
        if self.rope_limit is None or max(rope_lens) <= self.rope_limit:
            cos, sin = rotary(pos[None], 0, self.dtype)
            return cos[0], sin[0]
        # Pieces: the decodes (each with its own length) then each prefill chunk.
        lens = [1] * piece_lens[0] + piece_lens[1:]
        cos_parts, sin_parts, offset = [], [], 0
        for n, seq_len in zip(lens, rope_lens, strict=True):
            c, s = rotary(pos[None, offset : offset + n], seq_len, self.dtype)
            cos_parts.append(c[0])
            sin_parts.append(s[0])
            offset += n
        return torch.cat(cos_parts), torch.cat(sin_parts)


def _rope_len(s: ScheduledSeq) -> int:
    """The key length upstream's dynamic-NTK RoPE sees for these tokens: the whole prompt for prompt
    tokens (upstream prefills it in one forward, so chunking must not change RoPE), else past + 1."""
    end = s.start + s.num_tokens
    return max(s.seq.num_prompt_tokens, end) if s.start < s.seq.num_prompt_tokens else end


def kmajor_linear_weights(model: nn.Module) -> None:
    """Store every Linear weight [out, in] transposed in memory (same values, same shape and names).

    `F.linear` then hands MKL a plain row-major [in, out] matrix, and MKL's small-batch kernels are
    2-3x faster on that layout than on the transposed one: at 16 decoding sequences the matmuls, which
    are 80% of a CPU step, drop from ~55 to ~150 GFLOP/s on this project's benchmark machine. Results
    change only in float rounding at batch 1 (a different gemv), and the model is changed in place,
    so every user of it sees the same weights. Idempotent.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()


# Rows (tokens) per matmul for which the prepacked oneDNN kernel beats MKL on this project's benchmark
# machine: 10-30 % faster from 4 to 64 rows, slower for 1 row (a plain GEMV) and for prefill chunks.
_PACKED_ROWS = (2, 256)


def _packed_or_mkl(self: nn.Linear, x: Tensor) -> Tensor:
    rows = x.numel() // self.in_features
    if _PACKED_ROWS[0] <= rows <= _PACKED_ROWS[1]:
        return torch.ops.mkldnn._linear_pointwise(x, self._engine_packed_weight, self.bias, "none", [], "")
    return F.linear(x, self.weight, self.bias)


def prepack_linear_weights(model: nn.Module) -> bool:
    """Give every Linear a oneDNN-prepacked copy of its weight, used for 2-256 rows (decode batches).

    Batched decode on CPU is matmul-bound: MKL repacks each weight on every call, which at 16 rows costs
    as much as the multiply; oneDNN's prepacked weights skip that. One row and long prefill chunks stay on
    MKL (faster there). Costs a second copy of the weights in memory. Returns False (nothing changed) when
    this torch build has no working oneDNN linear. Idempotent.
    """
    try:
        probe = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 4), 16)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4), probe, None, "none", [], "")
        if not torch.equal(out, torch.full((2, 8), 4.0)):
            raise RuntimeError(f"oneDNN linear gave {out.tolist()}")
    except Exception as exc:  # a CPU build without oneDNN, or the private ops changed
        log.warning("oneDNN prepacked linear unavailable (%s); decode matmuls stay on MKL", exc)
        return False
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and not hasattr(module, "_engine_packed_weight"):
                module._engine_packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 16)
                module.forward = types.MethodType(_packed_or_mkl, module)
    return True
