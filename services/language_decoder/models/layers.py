"""What every language model of the family shares: attention over any KV store, RMSNorm, SwiGLU, RoPE.

The attention math is the free function `attention()` so the paged serving engine can reuse it with its
own key/value storage; what a forward's attention needs besides the layer weights (RoPE cos/sin, mask,
where keys/values live) travels as one `AttentionContext`. `RotaryAttention` and `DecoderLayer` are the
per-layer bodies; each architecture (models/internlm2.py, models/llama.py) only says how its checkpoint's
projections produce q/k/v and what its parts are called.

Every projection is a plain `nn.Linear` of its own (no fused q/k/v or gate/up modules outside InternLM2's
checkpoint-native `wqkv`), so int8 quantisation and a later tensor-parallel split see ordinary layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def swiglu(x: Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> Tensor:
    """The gated MLP of every family member: down(silu(gate(x)) * up(x))."""
    return down(F.silu(gate(x)) * up(x))


def check_silu(hidden_act: str) -> None:
    if hidden_act != "silu":
        raise ValueError(f"the gated MLP uses silu; config says hidden_act={hidden_act!r}")


class GatedMLP(nn.Module):
    """SwiGLU with HF names (`gate_proj`, `up_proj`, `down_proj`): Llama, Qwen2, and Phi-3 after its
    fused `gate_up_proj` is split at load."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False) -> None:
        super().__init__()
        check_silu(hidden_act)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class RotaryAttention(nn.Module):
    """Grouped-query attention with RoPE; subclasses own the projections (`project`, `out`).

    `project(x)` gives q [B, T, H, D] and k, v [B, T, H_kv, D]; the rest (rotation, attention over the
    context's KV store or the forward's own tokens, output projection) is the same for every model.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int) -> None:
        super().__init__()
        if head_dim * num_heads != hidden_size:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if num_heads % num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def out(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, ctx: AttentionContext, layer_idx: int) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.kv is None:
            out = attention(q, k, v, ctx.mask, is_causal=ctx.is_causal)
        else:
            out = kv_attend(ctx, layer_idx, q, k, v)
        return self.out(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm block: h + attn(attn_norm(h)), then h + mlp(mlp_norm(h)).

    Subclasses create the four parts under their checkpoint's names and expose them as the properties
    `attn_norm`, `attn`, `mlp_norm`, `mlp`.
    """

    attn_norm: nn.Module
    attn: RotaryAttention
    mlp_norm: nn.Module
    mlp: nn.Module

    def forward(self, h: Tensor, ctx: AttentionContext, layer_idx: int) -> Tensor:
        # The layer index is an argument, not a module attribute: one compiled body serves every layer.
        h = h + self.attn(self.attn_norm(h), ctx, layer_idx)
        return h + self.mlp(self.mlp_norm(h))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """HF/upstream positions for a left-padded batch: cumsum(mask) - 1, with pad slots set to 1."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)
