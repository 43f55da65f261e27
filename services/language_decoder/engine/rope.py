"""RoPE for a packed engine step: each token's cos/sin, as the model's own forward would compute them."""

from __future__ import annotations

import torch
from torch import Tensor

from services.language_decoder.models.rope import RotaryEmbedding

from .scheduler import ScheduledSeq


class PackedRope:
    """RoPE cos/sin [N, head_dim] for a packed step, the same values the model's own forward computes.

    Up to the rotary's `seq_len_limit` (dynamic NTK: max_position_embeddings; Phi-3: its original
    context) RoPE depends on the position only: when `max_model_len` stays within it (`position_only`),
    one table for `max_model_len` positions is computed once and looked up per step. Past it, each
    sequence's tokens are rotated with its own key length. A decode token at position p always has key
    length p + 1, so where the rotary can tabulate that (`decode_table`: every variant but dynamic NTK
    past its limit) decode steps, CUDA graphs included, look RoPE up in a table either way.
    """

    def __init__(self, rotary: RotaryEmbedding, max_model_len: int, dtype: torch.dtype, device: torch.device):
        self.rotary, self.dtype = rotary, dtype
        self.limit = rotary.seq_len_limit
        self.position_only = self.limit is None or max_model_len <= self.limit
        with torch.inference_mode():
            self.decode_table = rotary.decode_table(max_model_len, dtype, device)

    def lookup(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin of decode tokens at `positions` [N] (on the table's device); needs `decode_table`.
        Below the limit every token's RoPE is its decode-table row."""
        cos, sin = self.decode_table
        return cos.index_select(0, positions), sin.index_select(0, positions)

    def __call__(self, positions: Tensor, scheduled: list[ScheduledSeq]) -> tuple[Tensor, Tensor]:
        """cos/sin for `positions` [N], the tokens of `scheduled` in row order (one piece each)."""
        if self.position_only:
            return self.lookup(positions)
        rope_lens = [_rope_len(s) for s in scheduled]
        if max(rope_lens) <= self.limit:
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
    """The key length upstream's scaled RoPE sees for these tokens: the whole prompt for prompt tokens
    (upstream prefills it in one forward, so chunking must not change RoPE), else past + 1."""
    end = s.start + s.num_tokens
    return max(s.seq.num_prompt_tokens, end) if s.start < s.seq.num_prompt_tokens else end
