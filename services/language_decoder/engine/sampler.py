"""Per-request next-token choice for a batch, reusing the HF-order processors of `generate.py`.

Greedy rows without a repetition penalty (the common case) share one argmax. Every other row is
processed on its own, and a sampled row draws from its sequence's own `torch.Generator`: a seeded
request gets the same tokens whatever else is in the batch, and whichever step or batch row it lands in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.language_decoder.generate import sample

from .sequence import Sequence


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # a fresh random stream, still private to this sequence
    else:
        gen.manual_seed(seed)
    return gen


@torch.inference_mode()
def sample_next(logits: Tensor, seqs: list[Sequence]) -> list[int]:
    """Next token id for each row of `logits` [B, V] (row i belongs to `seqs[i]`)."""
    if not seqs:
        return []
    plain = [i for i, s in enumerate(seqs) if s.sampling.greedy and s.sampling.repetition_penalty == 1.0]
    tokens: list[int] = [0] * len(seqs)
    if len(plain) == len(seqs):
        return logits.argmax(dim=-1).tolist()
    if plain:
        index = torch.tensor(plain, device=logits.device)
        for i, tok in zip(plain, logits.index_select(0, index).argmax(dim=-1).tolist(), strict=True):
            tokens[i] = tok
    plain_set = set(plain)
    rest = [i for i in range(len(seqs)) if i not in plain_set]
    picks = []
    for i in rest:
        seq, p = seqs[i], seqs[i].sampling
        if not p.greedy and seq.generator is None:
            seq.generator = make_generator(p.seed, logits.device)
        picks.append(
            sample(
                logits[i : i + 1], do_sample=not p.greedy, temperature=p.temperature, top_k=p.top_k,
                top_p=p.top_p, repetition_penalty=p.repetition_penalty,
                prev_tokens=seq.prev_tokens(logits.device) if p.repetition_penalty != 1.0 else None,
                generator=seq.generator,
            )
        )
    for i, tok in zip(rest, torch.cat(picks).tolist(), strict=True):
        tokens[i] = tok
    return tokens
