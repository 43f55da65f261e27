"""RoPE variants of the family, each written to give upstream's float32 cos/sin bit for bit.

Every variant has the same interface: `forward(position_ids [B, T], seq_len, dtype)` -> cos, sin
[B, T, head_dim] (the HF half-split layout), where `seq_len` is the key length upstream's forward
would see for these tokens (past + new; for a prompt, the whole prompt). `seq_len_limit` is the key
length up to which RoPE depends on the position alone (None: always); the engine builds one position
table below it and computes per sequence above it.

- `RotaryEmbedding`: plain RoPE, InternLM2's linear scaling (positions divided by the factor) and
  dynamic NTK (InternLM2, and Llama's `dynamic`, the same formula). Dynamic NTK upstream keeps a
  cos/sin table that grows with the longest forward seen and never shrinks: a request's rotation
  depends on earlier traffic there. Here the base is recomputed per forward from that forward's
  `seq_len` and only the new tokens are rotated with it, which equals upstream for every request that
  starts from a fresh upstream model (prefill and every decode step).
- `LongRopeEmbedding`: Phi-3's `su` / `longrope` (and `yarn`): per-frequency `short_factor` while the
  forward's `seq_len` is within `original_max_position_embeddings`, `long_factor` beyond, and cos/sin
  multiplied by an attention factor (upstream `internvl/model/phi3/modeling_phi3.py`,
  `Phi3SuScaledRotaryEmbedding`, where `seq_len` is max(position_ids) + 1 of the forward). Cached keys
  keep the factors they were written with, as upstream's do.
- `Llama3RotaryEmbedding`: transformers' `rope_type: llama3` (Llama 3.1): fixed frequencies, long
  wavelengths divided by `factor`, a smooth blend between `low_freq_factor` and `high_freq_factor`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from services.common.model_config import LLMConfig


def _exponents(dim: int, device: torch.device | str | None) -> Tensor:
    # Same expression as upstream (int64 arange, then float) so the float32 values are bit-identical.
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


class RotaryEmbedding(nn.Module):
    """Plain RoPE with InternLM2's linear / dynamic-NTK scaling, evaluated per forward (module doc)."""

    SCALING_TYPES: tuple[str, ...] = ("dynamic", "linear")

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.dim = cfg.head_dim
        self.base = cfg.rope_theta
        self.max_position_embeddings = cfg.max_position_embeddings
        self.scaling = cfg.rope_scaling
        if self.scaling is not None and self.scaling.type not in self.SCALING_TYPES:
            raise ValueError(
                f"{cfg.architecture}: rope_scaling type {self.scaling.type!r} is not supported "
                f"(supported: {', '.join(self.SCALING_TYPES) or 'none, rope_scaling must be null'})"
            )
        self.register_buffer("inv_freq", self._inv_freq(self.base, None), persistent=False)

    @property
    def seq_len_limit(self) -> int | None:
        dynamic = self.scaling is not None and self.scaling.type == "dynamic"
        return self.max_position_embeddings if dynamic else None

    def _inv_freq(self, base: float, device: torch.device | str | None) -> Tensor:
        return 1.0 / (base ** _exponents(self.dim, device))

    def init_buffers(self, device: torch.device | str) -> None:
        """(Re)create `inv_freq` in float32 on `device`, e.g. after a meta-device build."""
        self.inv_freq = self._inv_freq(self.base, device)

    def inv_freq_for(self, seq_len: int) -> Tensor:
        """Inverse frequencies for a forward whose keys span `seq_len` slots (past + new)."""
        limit = self.seq_len_limit
        if limit is not None and seq_len > limit:
            factor = self.scaling.factor
            base = self.base * ((factor * seq_len / limit) - (factor - 1)) ** (self.dim / (self.dim - 2))
            return self._inv_freq(base, self.inv_freq.device)
        return self.inv_freq

    def attention_factor(self, seq_len: int) -> float:
        """Upstream's multiplier of cos/sin (1 except for Phi-3's long-context RoPE)."""
        return 1.0

    def decode_table(
        self, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> tuple[Tensor, Tensor] | None:
        """cos/sin [max_len, head_dim]: row p is RoPE of a token at position p whose forward's key length
        is p + 1 (a decode step; below `seq_len_limit`, any token at p). None where that takes one RoPE
        base per position (dynamic NTK past its limit)."""
        limit = self.seq_len_limit
        if limit is not None and max_len > limit:
            return None
        cos, sin = self(torch.arange(max_len, device=device)[None], 0, dtype)
        return cos[0], sin[0]

    def forward(self, position_ids: Tensor, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [B, T, head_dim] for `position_ids` [B, T], computed in fp32 then cast (as upstream)."""
        t = position_ids.to(torch.float32)
        if self.scaling is not None and self.scaling.type == "linear":
            t = t / self.scaling.factor
        freqs = t[..., None] * self.inv_freq_for(seq_len).to(t.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        scale = self.attention_factor(seq_len)
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        return cos.to(dtype), sin.to(dtype)


class PlainRotaryEmbedding(RotaryEmbedding):
    """RoPE without scaling: Qwen2 (transformers 4.44's Qwen2 ignores `rope_scaling`, so a config that
    sets one is refused rather than served differently from upstream)."""

    SCALING_TYPES = ()


class LongRopeEmbedding(RotaryEmbedding):
    """Phi-3's long-context RoPE (`su`, `longrope`, `yarn`): short/long per-frequency factors."""

    SCALING_TYPES = ("su", "longrope", "yarn")

    def __init__(self, cfg: LLMConfig) -> None:
        scaling = cfg.rope_scaling  # checked before the base class computes frequencies from it
        if scaling is None or scaling.type not in self.SCALING_TYPES:
            raise ValueError(f"Phi-3 long-context RoPE needs rope_scaling of type {', '.join(self.SCALING_TYPES)} "
                             f"with short_factor and long_factor, got {scaling!r}")
        original = cfg.original_max_position_embeddings or scaling.original_max_position_embeddings
        if not original:
            raise ValueError(f"rope_scaling type {scaling.type!r} needs original_max_position_embeddings")
        half = cfg.head_dim // 2
        for name in ("short_factor", "long_factor"):
            factors = getattr(scaling, name)
            if factors is None or len(factors) != half:
                raise ValueError(f"rope_scaling.{name} must list head_dim/2 = {half} factors, got {factors!r}")
        super().__init__(cfg)
        self.original_max_position_embeddings = original
        scale = self.max_position_embeddings / self.original_max_position_embeddings
        if scaling.attention_factor is not None:  # transformers' longrope lets the config set it
            self._attention_factor = scaling.attention_factor
        elif scale <= 1.0:
            self._attention_factor = 1.0
        elif scaling.type == "yarn":
            self._attention_factor = 0.1 * math.log(scale) + 1.0
        else:
            self._attention_factor = math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))
        self.register_buffer("long_inv_freq", self._inv_freq(self.base, None, long=True), persistent=False)

    @property
    def seq_len_limit(self) -> int:
        return self.original_max_position_embeddings

    def _factors(self, long: bool, device: torch.device | str | None) -> Tensor:
        factors = self.scaling.long_factor if long else self.scaling.short_factor
        return torch.tensor(factors, dtype=torch.float32, device=device)

    def _inv_freq(self, base: float, device: torch.device | str | None, long: bool = False) -> Tensor:
        return 1.0 / (self._factors(long, device) * base ** _exponents(self.dim, device))

    def init_buffers(self, device: torch.device | str) -> None:
        self.inv_freq = self._inv_freq(self.base, device)
        self.long_inv_freq = self._inv_freq(self.base, device, long=True)

    def inv_freq_for(self, seq_len: int) -> Tensor:
        return self.long_inv_freq if seq_len > self.original_max_position_embeddings else self.inv_freq

    def attention_factor(self, seq_len: int) -> float:
        return self._attention_factor

    def decode_table(
        self, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> tuple[Tensor, Tensor] | None:
        # Two regimes only: short factors for positions below the limit, long ones from there on.
        limit = self.original_max_position_embeddings
        positions = torch.arange(max_len, device=device)[None]
        short = self(positions[:, :limit], limit, dtype)
        if max_len <= limit:
            return short[0][0], short[1][0]
        long = self(positions[:, limit:], max_len, dtype)
        return torch.cat((short[0][0], long[0][0])), torch.cat((short[1][0], long[1][0]))


class Llama3RotaryEmbedding(RotaryEmbedding):
    """transformers' `rope_type: llama3` (`_compute_llama3_parameters`, 4.44)."""

    SCALING_TYPES = ("llama3",)

    def _inv_freq(self, base: float, device: torch.device | str | None) -> Tensor:
        inv_freq = super()._inv_freq(base, device)
        s = self.scaling
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if getattr(s, k) is None]
        if missing:
            raise ValueError(f"rope_scaling type 'llama3' needs {', '.join(missing)}")
        old_context_len = s.original_max_position_embeddings
        low_freq_wavelen = old_context_len / s.low_freq_factor
        high_freq_wavelen = old_context_len / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (old_context_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / s.factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)


class LlamaRotaryEmbedding(RotaryEmbedding):
    """Llama's plain RoPE or `dynamic` NTK (the same formula as InternLM2's). transformers' `linear` for
    Llama divides the frequencies rather than the positions (another float rounding than InternLM2's);
    it is refused until a member needs it."""

    SCALING_TYPES = ("dynamic",)


def llama_rotary(cfg: LLMConfig) -> RotaryEmbedding:
    """Llama's RoPE variant for `cfg.rope_scaling` (none, dynamic, llama3)."""
    if cfg.rope_scaling is not None and cfg.rope_scaling.type == "llama3":
        return Llama3RotaryEmbedding(cfg)
    return LlamaRotaryEmbedding(cfg)
