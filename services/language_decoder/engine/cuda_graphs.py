"""CUDA graphs for decode-only steps (GPU only): one launch replays the whole model for a batch.

At batch 1 a decode step is dozens of small kernels per layer; launching them one by one costs more
than the weight reads they do. Graphs are captured lazily per (batch bucket, context bucket): batch
sizes round up to 1, 2, 4, 8, then multiples of 16; with SDPA the gathered key length rounds up to a
power of two (flash-attn reads the block table in place, so it needs one bucket). Padded rows write
to and read from the cache's scratch block. Static input buffers are filled before each replay.
RoPE comes from the runner's decode table (`PackedRope.lookup`): graphs run wherever a decode token's
RoPE depends on its position alone (everywhere but dynamic NTK past its threshold).
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.language_decoder.models import CausalLM
from services.language_decoder.models.layers import AttentionContext

from .attention import flash_attn_with_kvcache, sdpa_decode, slot_table
from .config import EngineConfig
from .kv_cache import PagedKVCache
from .rope import PackedRope
from .scheduler import ScheduledSeq


class _GraphDecodeAttention:
    """`KVStore` over static buffers: decode rows only, shapes fixed at capture."""

    def __init__(self, cache: PagedKVCache, slots: Tensor, key_slots: Tensor | None, mask: Tensor | None,
                 lens32: Tensor | None, tables32: Tensor | None) -> None:
        self.cache, self.slots, self.key_slots, self.mask = cache, slots, key_slots, mask
        self.lens32, self.tables32 = lens32, tables32

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        k_flat, v_flat = self.cache.write(layer, self.slots, k, v)
        qd = q[0].transpose(0, 1)  # [B, H, D]
        if self.tables32 is not None:
            k_blocks, v_blocks = self.cache.blocks(layer)
            out = flash_attn_with_kvcache(
                qd.unsqueeze(1), k_blocks, v_blocks, cache_seqlens=self.lens32,
                block_table=self.tables32, causal=True,
            ).squeeze(1)
        else:
            out = sdpa_decode(qd, k_flat, v_flat, self.key_slots, self.mask)
        return out.transpose(0, 1).unsqueeze(0)


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        cache: PagedKVCache,
        config: EngineConfig,
        use_flash: bool,
        capture: bool = True,
        rope: PackedRope | None = None,
    ) -> None:
        # capture=False runs the same padded static-shape body eagerly: how CPU tests check it.
        self.model, self.cache, self.config, self.use_flash = model, cache, config, use_flash
        self.capture = capture
        if rope is None:  # the runner passes its own; a standalone instance builds the same table
            rope = PackedRope(model.rotary, config.max_model_len, model.dtype, cache.storage.device)
        if rope.decode_table is None:
            raise ValueError("CUDA graphs need a RoPE table for decode steps (no dynamic-NTK rescaling "
                             "within max_model_len)")
        self.rope = rope
        self.block_size = config.block_size
        self.max_batch = config.max_num_seqs
        self.batch_buckets = sorted({1, 2, 4, 8, *range(16, self.max_batch + 16, 16)})
        self.batch_buckets = [b for b in self.batch_buckets if b < self.max_batch] + [self.max_batch]
        max_ctx = config.max_blocks_per_seq * self.block_size
        buckets, n = [], max(256, self.block_size)
        while n < max_ctx:
            buckets.append(n)
            n *= 2
        self.ctx_buckets = [max_ctx] if use_flash else [*buckets, max_ctx]
        dev = cache.storage.device
        self.scratch_slot = cache.scratch_block * self.block_size
        m, nb = self.max_batch, config.max_blocks_per_seq
        self.ids = torch.zeros(m, dtype=torch.long, device=dev)
        self.positions = torch.zeros(m, dtype=torch.long, device=dev)
        self.slots = torch.full((m,), self.scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.full((m, nb), cache.scratch_block, dtype=torch.long, device=dev)
        self.lens = torch.ones(m, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = None

    def fits(self, decodes: list[ScheduledSeq]) -> bool:
        return 0 < len(decodes) <= self.max_batch and all(s.emits_token for s in decodes)

    def _body(self, batch: int, ctx: int) -> Tensor:
        model = self.model
        embeds = model.embed_rows(self.ids[:batch])
        cos, sin = self.rope.lookup(self.positions[:batch])
        lens = self.lens[:batch]
        if self.use_flash:
            kv = _GraphDecodeAttention(
                self.cache, self.slots[:batch], None, None, lens.to(torch.int32),
                self.tables[:batch].to(torch.int32),
            )
        else:
            key_slots = slot_table(self.tables[:batch, : ctx // self.block_size], ctx, self.block_size)
            mask = torch.arange(ctx, device=lens.device)[None, :] < lens[:, None]
            kv = _GraphDecodeAttention(self.cache, self.slots[:batch], key_slots, mask, None, None)
        return model.forward_flat(embeds, AttentionContext(cos[None], sin[None], kv=kv), None)

    def _capture(self, batch: int, ctx: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and the allocator outside the capture
                self._body(batch, ctx)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._body(batch, ctx)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, out

    @torch.inference_mode()
    def run(self, decodes: list[ScheduledSeq]) -> Tensor:
        b = len(decodes)
        batch = next(x for x in self.batch_buckets if x >= b)
        need = max(s.start + 1 for s in decodes)
        ctx = next(x for x in self.ctx_buckets if x >= need)
        key = (batch, ctx)
        if self.capture and key not in self.graphs:
            self._fill_padding(0)  # capture runs the body: make every row write to the scratch block
            self.graphs[key] = self._capture(batch, ctx)
        block_size = self.block_size
        width = -(-ctx // block_size)
        tables = self.cache.block_tables([s.seq.block_table for s in decodes], width, num_rows=batch)
        pos = [s.start for s in decodes]
        host = torch.tensor(
            [
                [s.seq.token_ids[p] for s, p in zip(decodes, pos, strict=True)] + [0] * (batch - b),
                pos + [0] * (batch - b),
                [s.seq.block_table[p // block_size] * block_size + p % block_size
                 for s, p in zip(decodes, pos, strict=True)]
                + [self.scratch_slot] * (batch - b),
                [p + 1 for p in pos] + [1] * (batch - b),
            ],
            dtype=torch.long,
        ).to(self.ids.device, non_blocking=True)
        self.ids[:batch].copy_(host[0])
        self.positions[:batch].copy_(host[1])
        self.slots[:batch].copy_(host[2])
        self.lens[:batch].copy_(host[3])
        self.tables[:batch, :width].copy_(tables.to(self.tables.device, non_blocking=True))
        if not self.capture:
            return self._body(batch, ctx)[:b]
        graph, out = self.graphs[key]
        graph.replay()
        return out[:b]

    def _fill_padding(self, start: int) -> None:
        self.ids[start:].zero_()
        self.positions[start:].zero_()
        self.slots[start:].fill_(self.scratch_slot)
        self.tables[start:].fill_(self.cache.scratch_block)
        self.lens[start:].fill_(1)
