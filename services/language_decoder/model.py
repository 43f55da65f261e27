"""InternLM2 decoder (the language half of InternVL2-8B), written to match upstream numerics.

Reference: `internvl_chat/internvl/model/internlm2/modeling_internlm2.py` in OpenGVLab/InternVL at
commit 74126371 (eager attention path). The module tree mirrors the checkpoint below
`language_model.` so weights load by name with no remapping:

    model.tok_embeddings, model.layers.N.{attention.wqkv, attention.wo, attention_norm,
    feed_forward.{w1,w2,w3}, ffn_norm}, model.norm, output

Built on the meta device and filled with `assign=True` (gpt-fast style), so loading never allocates
random weights first. The attention math is the free function `attention()` so the paged serving
engine can reuse it with its own key/value storage; what a forward's attention needs besides the
layer weights (RoPE cos/sin, mask, where keys/values live) travels as one `AttentionContext`.

RoPE and dynamic NTK scaling -- how upstream behaves and what this module does:
upstream's `InternLM2DynamicNTKScalingRotaryEmbedding` keeps a cos/sin table on the module. It is
built at init for `max_position_embeddings` positions with the plain base (`rope_theta`). A forward
whose key length `kv_seq_len` (past + new tokens, left padding included) exceeds the table's length
rebuilds the whole table for `kv_seq_len` positions with
`base = theta * ((factor * kv_seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))`, and the
table never shrinks. Consequences upstream: (a) keys already in the KV cache keep the rotation of the
base that was current when they were written; (b) once one long request has grown the table, every
later request in the same process, however short, is rotated with that stale, scaled base.
This module recomputes the base per forward from that forward's `kv_seq_len` and rotates only the
new tokens with it. That equals upstream exactly for every request that starts from a fresh upstream
model (empty cos/sin cache beyond `max_position_embeddings`), prefill and every decode step included,
and it deliberately does not reproduce (b), which makes upstream's output depend on earlier traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.common.checkpoint import (
    LLM_PREFIXES,
    assign_weights,
    default_dtype,
    load_tensors,
    resolve_model_dir,
)
from services.common.model_config import InternVLConfig, LLMConfig
from services.common.quantization import INT8, NO_QUANTIZATION, check_quantize
from services.language_decoder.quantize import int8_loader

# SDPA grew native grouped-query attention (`enable_gqa`) in torch 2.5; older builds repeat k/v.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class KVStore(Protocol):
    """Where a layer's new keys/values go and what its queries attend to.

    `KVCache` below is the static batch cache of the simple generation loop; the serving engine's paged
    cache (`services/language_decoder/engine/attention.py`) implements the same method, so the model
    never sees requests, blocks or slot mappings.
    """

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """Store `k`/`v` [B, H_kv, T, D] for `layer`, return attention output [B, H, T, D] for `q`."""
        ...


@dataclass(frozen=True)
class AttentionContext:
    """One forward's attention inputs, shared by every layer (built once per forward, passed explicitly).

    `cos`/`sin` [B, T, head_dim]: RoPE of the new tokens (the caller computes them: the dynamic-NTK
    base depends on each sequence's length). `mask` (bool [B or 1, 1, T, S], True = may attend) and
    `is_causal` are for `attention()` over this forward's own tokens or a static `KVCache`; the paged
    engine's stores know their own masks. `kv`: where keys/values go and what queries attend to
    (None: the new tokens attend to each other only).
    """

    cos: Tensor
    sin: Tensor
    mask: Tensor | None = None
    is_causal: bool = False
    kv: KVStore | None = None


@torch.compiler.disable
def kv_attend(ctx: AttentionContext, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`ctx.kv.attend`, kept out of compiled graphs.

    Stores write into caches that live outside the layer (the engine's is one preallocated tensor of
    tens of GiB); a compiled layer (see `compile_layers`) breaks its graph here and runs this eagerly,
    so what is compiled stays pure: the norms, projections, RoPE, residuals and the FFN.
    """
    return ctx.kv.attend(layer, q, k, v, ctx.mask, ctx.is_causal)


class KVCache:
    """Static per-layer key/value storage for one batch, preallocated for `max_seq_len` slots.

    Slots are shared by all rows of the batch (row b's token at slot s may be left padding); RoPE
    positions are separate (`position_ids`). Each layer writes the new tokens at
    `[seq_len, seq_len + T)` and attends over `[0, seq_len + T)`; the model calls `advance(T)` once
    after all layers have written.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.seq_len = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store `k`/`v` [B, H_kv, T, D] for `layer`; return the keys/values of all slots so far."""
        start, end = self.seq_len, self.seq_len + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: {end} slots needed, {self.max_seq_len} allocated")
        if k.shape[0] != self.batch_size:
            raise ValueError(f"KV cache holds {self.batch_size} rows, got a batch of {k.shape[0]}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        k, v = self.update(layer, k, v)
        return attention(q, k, v, mask, is_causal=is_causal)

    def advance(self, n: int) -> None:
        self.seq_len += n

    def reset(self) -> None:
        self.seq_len = 0


def split_wqkv(
    qkv: Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Split the fused projection [B, T, (H + 2*H_kv) * D] into q [B,T,H,D], k and v [B,T,H_kv,D].

    Upstream packs the rows per KV group, not as [q | k | v]: for each kv head g, its
    H/H_kv query heads, then its key head, then its value head (einops `b q (h gs d)`,
    gs = H/H_kv + 2). Query head h*gs_q + i therefore belongs to kv head h, which is the
    grouping `repeat_kv`/SDPA's GQA assume.
    """
    b, t, _ = qkv.shape
    group = num_heads // num_kv_heads
    qkv = qkv.view(b, t, num_kv_heads, group + 2, head_dim)
    q = qkv[:, :, :, :group].reshape(b, t, num_heads, head_dim)
    return q, qkv[:, :, :, group], qkv[:, :, :, group + 1]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D] (the HF half-split layout, not interleaved pairs)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, is_causal: bool = False
) -> Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q [B, H, T, D]; k, v [B, H_kv, S, D]; `mask` bool [B or 1, 1, T, S], True = may attend. Every query
    row must allow at least one key (a fully masked row gives NaN that would then poison the cache).
    `is_causal` is only valid for T == S (no past), where SDPA's top-left causal alignment is right.
    """
    if q.shape[1] != k.shape[1]:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True
            )
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def build_attention_mask(
    attention_mask: Tensor | None, q_len: int, past_len: int, device: torch.device
) -> tuple[Tensor | None, bool]:
    """The (mask, is_causal) pair for `attention()` over slots [0, past_len + q_len).

    `attention_mask` [B, S] is HF's padding mask over all slots (1 = token, 0 = padding).
    Upstream adds finfo.min for padded keys, which gives them weight exactly 0 for real queries; a
    query that is itself padding still gets a finite, meaningless output there. Here such a query
    may attend to its own slot only, so its row is never fully masked (no NaN) and real rows are
    unaffected: padded keys are masked for them either way.
    """
    total = past_len + q_len
    if attention_mask is None or bool(attention_mask.all()):
        if q_len == 1:
            return None, False
        if past_len == 0:
            return None, True
    q_slots = torch.arange(past_len, total, device=device)[:, None]
    k_slots = torch.arange(total, device=device)[None, :]
    causal = k_slots <= q_slots  # [T, S]
    if attention_mask is None:
        return causal[None, None], False
    if attention_mask.shape[-1] != total:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} slots, expected {total}")
    valid = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return causal & (valid | (k_slots == q_slots)), False


class RotaryEmbedding(nn.Module):
    """RoPE with upstream's linear / dynamic-NTK scaling, evaluated per forward (see module doc)."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.dim = cfg.head_dim
        self.base = cfg.rope_theta
        self.max_position_embeddings = cfg.max_position_embeddings
        self.scaling = cfg.rope_scaling
        if self.scaling is not None and self.scaling.type not in ("dynamic", "linear"):
            raise ValueError(f"unknown rope_scaling type {self.scaling.type!r}")
        self.register_buffer("inv_freq", self._inv_freq(self.base, None), persistent=False)

    def _inv_freq(self, base: float, device: torch.device | str | None) -> Tensor:
        # Same expression as upstream so the float32 values are bit-identical.
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def init_buffers(self, device: torch.device | str) -> None:
        """(Re)create `inv_freq` in float32 on `device`, e.g. after a meta-device build."""
        self.inv_freq = self._inv_freq(self.base, device)

    def inv_freq_for(self, seq_len: int) -> Tensor:
        """Inverse frequencies for a forward whose keys span `seq_len` slots (past + new)."""
        dynamic = self.scaling is not None and self.scaling.type == "dynamic"
        if dynamic and seq_len > self.max_position_embeddings:
            factor = self.scaling.factor
            base = self.base * (
                (factor * seq_len / self.max_position_embeddings) - (factor - 1)
            ) ** (self.dim / (self.dim - 2))
            return self._inv_freq(base, self.inv_freq.device)
        return self.inv_freq

    def forward(self, position_ids: Tensor, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [B, T, head_dim] for `position_ids` [B, T], computed in fp32 then cast (as upstream)."""
        t = position_ids.to(torch.float32)
        if self.scaling is not None and self.scaling.type == "linear":
            t = t / self.scaling.factor
        freqs = t[..., None] * self.inv_freq_for(seq_len).to(t.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the weight, exactly like upstream (matters in bf16).
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class FeedForward(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"InternLM2 uses silu; config says {cfg.hidden_act!r}")
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: Tensor, ctx: AttentionContext, layer_idx: int) -> Tensor:
        b, t, _ = x.shape
        q, k, v = split_wqkv(self.wqkv(x), self.num_heads, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.kv is None:
            out = attention(q, k, v, ctx.mask, is_causal=ctx.is_causal)
        else:
            out = kv_attend(ctx, layer_idx, q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: Tensor, ctx: AttentionContext, layer_idx: int) -> Tensor:
        # The layer index is an argument, not a module attribute: one compiled body serves every layer.
        h = h + self.attention(self.attention_norm(h), ctx, layer_idx)
        return h + self.feed_forward(self.ffn_norm(h))


class InternLM2Model(nn.Module):
    """The transformer body (`language_model.model.*`)."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: Tensor, ctx: AttentionContext) -> Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, ctx, i)
        return self.norm(h)


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = InternLM2Model(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)  # no weights; `inv_freq` is a non-persistent buffer

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    def new_kv_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        cfg = self.config
        return KVCache(
            cfg.num_hidden_layers, batch_size, max_seq_len, cfg.num_key_value_heads, cfg.head_dim,
            dtype=self.dtype, device=self.device,
        )

    def embed(
        self, input_ids: Tensor, image_embeds: Tensor | None = None, img_context_id: int | None = None
    ) -> Tensor:
        """Token embeddings with every `<IMG_CONTEXT>` position replaced by the next visual row.

        `image_embeds` [n_ctx, hidden] (any leading shape is flattened) holds the projected vision
        features in prompt order; across a batch, rows are consumed in row-major order of
        `input_ids`, as upstream's flattened assignment does.
        """
        if img_context_id is None:
            if image_embeds is not None:
                raise ValueError("image_embeds given without img_context_id")
            return self.embed_rows(input_ids)
        index = (input_ids == img_context_id).reshape(-1).nonzero().squeeze(1)
        rows = image_embeds.reshape(-1, self.config.hidden_size) if image_embeds is not None else None
        n_rows = 0 if rows is None else rows.shape[0]
        if index.numel() != n_rows:
            raise ValueError(
                f"prompt has {index.numel()} <IMG_CONTEXT> tokens but {n_rows} image embedding rows were given"
            )
        return self.embed_rows(input_ids, rows if n_rows else None, index)

    def embed_rows(
        self, input_ids: Tensor, image_rows: Tensor | None = None, image_index: Tensor | None = None
    ) -> Tensor:
        """Token embeddings of `input_ids` (any shape) with `image_rows` [n, hidden] written at the
        flattened positions `image_index` [n] (long, on the model's device): where image features
        enter the language model, for the reference loop (`embed`) and the engine's packed steps."""
        embeds = self.model.tok_embeddings(input_ids)
        if image_rows is not None:
            rows = image_rows.to(device=embeds.device, dtype=embeds.dtype, non_blocking=True)
            embeds.view(-1, embeds.shape[-1]).index_copy_(0, image_index, rows)
        return embeds

    def forward(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor,
        kv_cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (float32) for `inputs_embeds` [B, T, H] at RoPE positions `position_ids` [B, T].

        With `kv_cache`, the new tokens occupy slots [kv_cache.seq_len, +T) after the cached ones.
        `attention_mask` [B, past + T] marks real tokens (1) vs left padding (0), as in HF; None
        means no padding. `last_only` returns [B, 1, V] (prefill for generation needs no more, and
        [T, V] logits of a long multimodal prompt would be large).
        """
        b, t, _ = inputs_embeds.shape
        past = kv_cache.seq_len if kv_cache is not None else 0
        if position_ids.shape != (b, t):
            raise ValueError(f"position_ids must be {(b, t)}, got {tuple(position_ids.shape)}")
        mask, is_causal = build_attention_mask(attention_mask, t, past, inputs_embeds.device)
        cos, sin = self.rotary(position_ids, past + t, inputs_embeds.dtype)
        h = self.model(inputs_embeds, AttentionContext(cos, sin, mask, is_causal, kv_cache))
        if kv_cache is not None:
            kv_cache.advance(t)
        if last_only:
            h = h[:, -1:]
        return self.output(h).float()

    def forward_flat(self, inputs_embeds: Tensor, ctx: AttentionContext, logits_indices: Tensor | None) -> Tensor:
        """The serving engine's path: tokens of many sequences packed into one row.

        `inputs_embeds` [N, H]; `ctx.cos`/`ctx.sin` [1, N, head_dim] (each token's RoPE, computed by
        the caller because the dynamic-NTK base depends on each token's own sequence); `ctx.kv` stores
        keys/values and knows which tokens attend to which (see `KVStore`). Returns float32 logits for
        the rows `logits_indices` (all rows when None): [len(logits_indices), V].
        """
        h = self.model(inputs_embeds[None], ctx)[0]
        if logits_indices is not None:
            h = h[logits_indices]
        return self.output(h).float()


def compile_layers(model: InternLM2ForCausalLM, mode: str = "default") -> None:
    """torch.compile each decoder layer (regional compilation: one compiled body serves all layers).

    For GPU decode, where a step is dozens of tiny elementwise kernels per layer around the matmuls;
    Inductor fuses them. Shapes become dynamic after the first new token count, so a few compiles cover
    every batch. The KV store stays eager (`kv_attend`).
    """
    config = torch._dynamo.config
    # Guards differ per KV store class and mask kind; leave room so no layer falls back to eager.
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = max(config.recompile_limit, 64)
    else:  # torch < 2.6
        config.cache_size_limit = max(config.cache_size_limit, 64)
    for layer in model.model.layers:
        layer.compile(mode=mode)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """HF/upstream positions for a left-padded batch: cumsum(mask) - 1, with pad slots set to 1."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def build_language_model(cfg: LLMConfig) -> InternLM2ForCausalLM:
    """The module tree; call under `torch.device('meta')` and load with `load_language_model`."""
    return InternLM2ForCausalLM(cfg)


def load_language_model(
    model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    quantize: str = NO_QUANTIZATION,
) -> InternLM2ForCausalLM:
    """Build on meta and assign the `language_model.*` tensors; vision tensors are never read.

    `quantize="int8"`: the decoder blocks' linear weights become int8 as each is read (see quantize.py).
    """
    model_dir = resolve_model_dir(model_dir)
    cfg = InternVLConfig.from_dir(model_dir).llm
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = build_language_model(cfg)
    convert = int8_loader(model, dtype) if check_quantize(quantize) == INT8 else None
    tensors = load_tensors(
        model_dir, LLM_PREFIXES, dtype=dtype, device=device, strip="language_model.", progress=False,
        convert=convert,
    )
    if convert is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the quantiser's fp32 temporaries: free before the KV cache is sized
    assign_weights(model, tensors, "language model")
    # Non-persistent buffers are not in the checkpoint: create them on the real device, in fp32.
    model.rotary.init_buffers(device)
    return model.eval()
