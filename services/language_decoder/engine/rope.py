"""RoPE for a packed engine step: each token's cos/sin, as the model's own forward would compute them."""

from __future__ import annotations

import torch
from torch import Tensor

from services.language_decoder.model import RotaryEmbedding

from .scheduler import ScheduledSeq


class PackedRope:
    """RoPE cos/sin [N, head_dim] for a packed step, the same values the model's own forward computes.

    Below the dynamic-NTK threshold (`position_only`) RoPE depends on the position only: one table for
    `max_model_len` positions, computed once by the model's `RotaryEmbedding` and looked up per step
    (also inside CUDA graphs). Past it, each sequence's tokens are rotated with the base of that
    sequence's own key length.
    """

    def __init__(self, rotary: RotaryEmbedding, max_model_len: int, dtype: torch.dtype, device: torch.device):
        self.rotary, self.dtype = rotary, dtype
        scaling = rotary.scaling
        # Dynamic NTK rescales RoPE once a sequence outgrows the table; only then is RoPE per sequence.
        self.limit = rotary.max_position_embeddings if scaling is not None and scaling.type == "dynamic" else None
        self.position_only = self.limit is None or max_model_len <= self.limit
        self.table: tuple[Tensor, Tensor] | None = None
        if self.position_only:
            with torch.inference_mode():
                cos, sin = rotary(torch.arange(max_model_len, device=device)[None], 0, dtype)
            self.table = (cos[0], sin[0])

    def lookup(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Table rows for `positions` [N] (on the table's device); only when `position_only`."""
        cos, sin = self.table
        return cos.index_select(0, positions), sin.index_select(0, positions)

    def __call__(self, positions: Tensor, scheduled: list[ScheduledSeq]) -> tuple[Tensor, Tensor]:
        """cos/sin for `positions` [N], the tokens of `scheduled` in row order (one piece each)."""
        if self.table is not None:
            return self.lookup(positions)
        rope_lens = [_rope_len(s) for s in scheduled]
        if self.limit is None or max(rope_lens) <= self.limit:
            cos, sin = self.rotary(positions[None], 0, self.dtype)
            return cos[0], sin[0]
        cos_parts, sin_parts, offset = [], [], 0
        for piece, seq_len in zip(scheduled, rope_lens, strict=True):
            cos, sin = self.rotary(positions[None, offset : offset + piece.num_tokens], seq_len, self.dtype)
            cos_parts.append(cos[0])
            sin_parts.append(sin[0])
            offset += piece.num_tokens
        return torch.cat(cos_parts), torch.cat(sin_parts)


def _rope_len(s: ScheduledSeq) -> int:
    """The key length upstream's dynamic-NTK RoPE sees for these tokens: the whole prompt for prompt
    tokens (upstream prefills it in one forward, so chunking must not change RoPE), else past + 1."""
    end = s.start + s.num_tokens
    return max(s.seq.num_prompt_tokens, end) if s.start < s.seq.num_prompt_tokens else end
