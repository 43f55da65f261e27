"""Next-token choice with Hugging Face `generate` semantics (transformers 4.44, as upstream `chat()`).

HF's logits processors then, when sampling, its warpers, in HF's order: repetition penalty, then
temperature, top-k, top-p; then argmax or a multinomial draw. Row-wise: rows with the same settings
may be processed as one batch. Shared by the reference loop (`generate.py`) and the engine's sampler.
"""

from __future__ import annotations

import torch
from torch import Tensor


def process_logits(
    logits: Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    prev_tokens: Tensor | None = None,
) -> Tensor:
    """HF's logits processors then (when sampling) warpers, in HF's order; float32 [B, V] scores."""
    scores = logits.float()
    if repetition_penalty != 1.0 and prev_tokens is not None and prev_tokens.numel():
        # HF RepetitionPenaltyLogitsProcessor: seen tokens' logits move towards "less likely".
        seen = scores.gather(1, prev_tokens)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        scores = scores.scatter(1, prev_tokens, seen)
    if not do_sample:
        return scores  # HF applies no warpers in greedy mode
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        # HF TopPLogitsWarper: drop the low tail whose total mass is <= 1 - top_p, keep >= 1 token.
        sorted_scores, sorted_idx = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, sorted_idx, drop), float("-inf"))
    return scores


def sample(
    logits: Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    prev_tokens: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids [B] from logits [B, V]: argmax, or a draw from `generator` when sampling."""
    scores = process_logits(
        logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, prev_tokens=prev_tokens,
    )
    if not do_sample:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)
