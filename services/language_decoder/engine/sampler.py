"""The next token of every row that samples this step, each by its own request's settings.

Rows are grouped so that most of a batch is one tensor operation: greedy rows without a repetition
penalty share one argmax; sampled rows without a seed or a penalty share one draw per distinct
(temperature, top-k, top-p), from the sampler's own randomly seeded stream. A seeded row draws
alone from its sequence's own `torch.Generator`, so a seeded request gets the same tokens whatever
else is in the batch and whichever step or row it lands in; a row with a repetition penalty is
processed alone too (the penalty sees that row's own generated tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.language_decoder.sampling import sample

from .request import SamplingParams
from .sequence import Sequence


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # a fresh random stream
    else:
        gen.manual_seed(seed)
    return gen


def _group_key(params: SamplingParams, row: int) -> tuple:
    """Rows with equal keys are processed as one batch; the rest get a key of their own."""
    if params.repetition_penalty == 1.0:
        if params.greedy:
            return ("greedy",)
        if params.seed is None:
            return ("sample", params.temperature, params.top_k, params.top_p)
    return ("row", row)


class Sampler:
    def __init__(self) -> None:
        self._unseeded: torch.Generator | None = None  # shared by every request without a seed

    @torch.inference_mode()
    def __call__(self, logits: Tensor, seqs: list[Sequence]) -> list[int]:
        """Next token id for each row of `logits` [B, V] (row i belongs to `seqs[i]`)."""
        groups: dict[tuple, list[int]] = {}
        for i, seq in enumerate(seqs):
            groups.setdefault(_group_key(seq.sampling, i), []).append(i)
        tokens: list[int] = [0] * len(seqs)
        for rows in groups.values():
            if len(rows) == len(seqs):
                part = logits
            else:
                part = logits.index_select(0, torch.tensor(rows, device=logits.device))
            for i, tok in zip(rows, self._pick(part, seqs[rows[0]]).tolist(), strict=True):
                tokens[i] = tok
        return tokens

    def _pick(self, logits: Tensor, seq: Sequence) -> Tensor:
        """Token ids [n] for rows that share `seq`'s settings (just `seq`'s row unless grouped)."""
        p = seq.sampling
        if p.greedy and p.repetition_penalty == 1.0:
            return logits.argmax(dim=-1)
        generator = None
        if not p.greedy:
            if p.seed is None:
                if self._unseeded is None:
                    self._unseeded = make_generator(None, logits.device)
                generator = self._unseeded
            else:
                if seq.generator is None:
                    seq.generator = make_generator(p.seed, logits.device)
                generator = seq.generator
        return sample(
            logits, do_sample=not p.greedy, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
            repetition_penalty=p.repetition_penalty,
            prev_tokens=seq.prev_tokens(logits.device) if p.repetition_penalty != 1.0 else None,
            generator=generator,
        )
