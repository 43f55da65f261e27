"""Paged attention for one engine step: the `KVStore` the model calls in every layer.

The runner packs a step's tokens into one row: first one token per decoding sequence, then each
prefill chunk. Per layer, `attend` writes the new keys/values to their slots in the paged cache
(`PagedKVCache.write`), then attends each query to its own sequence's keys:

- `SdpaAttention` (CPU, and GPU without flash-attn): the decodes as one padded batch, gathering every
  decoding sequence's keys by slot table with a length mask; each prefill chunk on its own, causal
  (bottom-right aligned when the chunk continues an earlier one). PyTorch SDPA does the math.
- `FlashAttention` (GPU with flash-attn installed and block_size % 256 == 0): flash-attn's paged
  kernels read the blocks in place, no gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from services.language_decoder.models.layers import attention

from .kv_cache import PagedKVCache

try:  # optional GPU dependency; CPU and the tests never need it
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = flash_attn_with_kvcache = None


@dataclass(frozen=True)
class PrefillChunk:
    q_start: int  # first row of this chunk in the packed batch
    q_len: int
    past: int  # tokens of this sequence already in the cache before the chunk
    block_table: list[int]

    @property
    def context_len(self) -> int:
        return self.past + self.q_len


@dataclass(frozen=True)
class StepMetadata:
    """Where a step's packed tokens go and what they see (plain lists, device tensors built by backends)."""

    slot_mapping: Tensor  # [N] long: cache slot of each packed token
    decode_context_lens: list[int]  # rows [0, num_decode) are decode tokens, one per sequence
    decode_block_tables: list[list[int]]
    prefills: list[PrefillChunk]

    @property
    def num_decode(self) -> int:
        return len(self.decode_context_lens)


def slot_table(block_tables: Tensor, num_slots: int, block_size: int) -> Tensor:
    """[B, max_blocks] block ids -> [B, num_slots] slot ids of positions 0..num_slots-1."""
    offsets = torch.arange(block_size, device=block_tables.device)
    slots = block_tables[:, :, None] * block_size + offsets
    return slots.reshape(block_tables.shape[0], -1)[:, :num_slots]


def gather(flat: Tensor, slots: Tensor) -> Tensor:
    """flat[slots] for a [slots, H_kv, D] cache; index_select is several times faster than indexing."""
    return flat.index_select(0, slots.reshape(-1)).view(*slots.shape, *flat.shape[1:])


def sdpa_decode(q: Tensor, k_flat: Tensor, v_flat: Tensor, slots: Tensor, mask: Tensor | None) -> Tensor:
    """q [B, H, D] (one token per sequence) against the keys at `slots` [B, S] -> [B, H, D].

    `mask` [B, S] (True = a real key) or None when every row has S keys.
    """
    k = gather(k_flat, slots).transpose(1, 2)  # [B, H_kv, S, D]
    v = gather(v_flat, slots).transpose(1, 2)
    out = attention(q.unsqueeze(2), k, v, None if mask is None else mask[:, None, None, :])
    return out.squeeze(2)


class SdpaAttention:
    """`KVStore` for one step, over a `PagedKVCache`, with PyTorch SDPA (see module doc)."""

    def __init__(self, cache: PagedKVCache, meta: StepMetadata, device: torch.device) -> None:
        self.cache = cache
        self.slot_mapping = meta.slot_mapping
        self.num_decode = meta.num_decode
        block_size = cache.block_size
        if meta.num_decode:
            lens = meta.decode_context_lens
            tables = meta.decode_block_tables
            bt = cache.block_tables(tables, max(len(t) for t in tables)).to(device, non_blocking=True)
            self.decode_slots = slot_table(bt, max(lens), block_size)
            uniform = min(lens) == max(lens)
            self.decode_mask = None if uniform else (
                torch.arange(max(lens)) < torch.tensor(lens)[:, None]
            ).to(device, non_blocking=True)
        self.prefills = []
        for chunk in meta.prefills:
            if chunk.past == 0:  # no earlier keys: attend to the chunk's own k/v, plain causal
                self.prefills.append((chunk, None, None))
                continue
            bt = torch.tensor([chunk.block_table], dtype=torch.long).to(device, non_blocking=True)
            slots = slot_table(bt, chunk.context_len, block_size)[0]
            q_pos = torch.arange(chunk.past, chunk.context_len)[:, None]
            mask = (torch.arange(chunk.context_len)[None, :] <= q_pos).to(device, non_blocking=True)
            self.prefills.append((chunk, slots, mask))

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        # q [1, H, N, D]; k, v [1, H_kv, N, D]: the packed step, one row.
        k_flat, v_flat = self.cache.write(layer, self.slot_mapping, k, v)
        parts = []
        b = self.num_decode
        if b:
            qd = q[0, :, :b].transpose(0, 1)  # [B, H, D]
            out = sdpa_decode(qd, k_flat, v_flat, self.decode_slots, self.decode_mask)
            parts.append(out.transpose(0, 1).unsqueeze(0))
        for chunk, slots, chunk_mask in self.prefills:
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            if slots is None:
                parts.append(attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], is_causal=True))
            else:
                kp = gather(k_flat, slots).transpose(0, 1).unsqueeze(0)
                vp = gather(v_flat, slots).transpose(0, 1).unsqueeze(0)
                parts.append(attention(q[:, :, rows], kp, vp, chunk_mask[None, None]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def flash_available(block_size: int, device: torch.device) -> bool:
    return flash_attn_with_kvcache is not None and device.type == "cuda" and block_size % 256 == 0


class FlashAttention:
    """`KVStore` for one step with flash-attn's paged kernels (GPU only; see module doc)."""

    def __init__(self, cache: PagedKVCache, meta: StepMetadata, device: torch.device) -> None:
        self.cache = cache
        self.slot_mapping = meta.slot_mapping
        self.num_decode = meta.num_decode

        def i32(rows: list) -> Tensor:
            return torch.tensor(rows, dtype=torch.int32).to(device, non_blocking=True)

        def padded(tables: list[list[int]]) -> Tensor:
            width = max(len(t) for t in tables)
            return cache.block_tables(tables, width, dtype=torch.int32).to(device, non_blocking=True)

        if meta.num_decode:
            self.decode_lens = i32(meta.decode_context_lens)
            self.decode_tables = padded(meta.decode_block_tables)
        self.prefills = meta.prefills
        if meta.prefills:
            q_lens = [c.q_len for c in meta.prefills]
            k_lens = [c.context_len for c in meta.prefills]
            self.cu_q = i32([0, *torch.tensor(q_lens).cumsum(0).tolist()])
            self.cu_k = i32([0, *torch.tensor(k_lens).cumsum(0).tolist()])
            self.max_q, self.max_k = max(q_lens), max(k_lens)
            self.prefill_tables = padded([c.block_table for c in meta.prefills])

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        self.cache.write(layer, self.slot_mapping, k, v)
        k_blocks, v_blocks = self.cache.blocks(layer)
        qt = q[0].transpose(0, 1)  # [N, H, D]
        parts = []
        b = self.num_decode
        if b:
            out = flash_attn_with_kvcache(
                qt[:b].unsqueeze(1), k_blocks, v_blocks, cache_seqlens=self.decode_lens,
                block_table=self.decode_tables, causal=True,
            )
            parts.append(out.squeeze(1))
        if self.prefills:
            out = flash_attn_varlen_func(
                qt[b:], k_blocks, v_blocks, cu_seqlens_q=self.cu_q, cu_seqlens_k=self.cu_k,
                max_seqlen_q=self.max_q, max_seqlen_k=self.max_k, causal=True,
                block_table=self.prefill_tables,
            )
            parts.append(out)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return out.transpose(0, 1).unsqueeze(0)  # [1, H, N, D]
