"""The engine's sampler: grouped rows, seeded rows exactly as drawn alone (no model needed)."""

from __future__ import annotations

import torch

from services.language_decoder import sampling
from services.language_decoder.engine import EngineRequest, SamplingParams
from services.language_decoder.engine import sampler as sampler_module
from services.language_decoder.engine.sampler import Sampler
from services.language_decoder.engine.sequence import Sequence


def seqs_for(params: list[SamplingParams]) -> list[Sequence]:
    return [Sequence(EngineRequest(f"r{i}", [3, 4, 5], p), i, 4) for i, p in enumerate(params)]


def test_rows_sharing_unseeded_settings_are_one_draw_and_seeded_rows_draw_alone(monkeypatch) -> None:
    calls: list[int] = []

    def counting_sample(logits, **kw):
        calls.append(logits.shape[0])
        return sampling.sample(logits, **kw)

    monkeypatch.setattr(sampler_module, "sample", counting_sample)
    hot = SamplingParams(do_sample=True, temperature=0.8, top_p=0.9)
    params = [SamplingParams(), hot, SamplingParams(do_sample=True, seed=11), hot, SamplingParams(), hot,
              SamplingParams(repetition_penalty=1.3)]
    logits = torch.randn(len(params), 50, generator=torch.Generator().manual_seed(0)) * 3
    seqs = seqs_for(params)
    tokens = Sampler()(logits, seqs)
    # One greedy argmax (no sample call), one draw for the three `hot` rows, one per seeded / penalised row.
    assert sorted(calls) == [1, 1, 3]
    assert tokens[0] == int(logits[0].argmax()) and tokens[4] == int(logits[4].argmax())
    alone = sampling.sample(logits[2:3], do_sample=True, generator=torch.Generator().manual_seed(11))
    assert tokens[2] == int(alone)
    penalised = sampling.sample(logits[6:7], repetition_penalty=1.3, prev_tokens=torch.empty(1, 0, dtype=torch.long))
    assert tokens[6] == int(penalised)


def test_a_seeded_row_continues_its_own_stream_across_steps() -> None:
    params = SamplingParams(do_sample=True, temperature=1.5, seed=7)
    gen = torch.Generator().manual_seed(1)
    steps = [torch.randn(2, 40, generator=gen) for _ in range(5)]
    sampler = Sampler()
    seqs = seqs_for([SamplingParams(do_sample=True), params])
    got = [sampler(logits, seqs)[1] for logits in steps]
    ref_gen = torch.Generator().manual_seed(7)
    want = [int(sampling.sample(logits[1:2], do_sample=True, temperature=1.5, generator=ref_gen)) for logits in steps]
    assert got == want
