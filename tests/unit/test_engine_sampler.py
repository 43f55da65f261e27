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


def test_a_penalised_row_sees_its_own_generated_tokens() -> None:
    # Token 7 leads token 9 by a little; row 0 already generated 7, so a penalty of 2 halves its logit and
    # 9 wins. Row 1 (same logits, nothing generated yet) keeps 7: the penalty reads each row's own output.
    logits = torch.zeros(2, 16)
    logits[:, 7], logits[:, 9] = 4.0, 3.0
    seqs = seqs_for([SamplingParams(repetition_penalty=2.0), SamplingParams(repetition_penalty=2.0)])
    seqs[0].append_token(7)
    assert Sampler()(logits, seqs) == [9, 7]
    # Without the penalty the generated 7 changes nothing.
    plain = seqs_for([SamplingParams()])
    plain[0].append_token(7)
    assert Sampler()(logits[:1], plain) == [7]


def test_top_k_and_top_p_reach_the_draw() -> None:
    # top_k=1 (or a top_p below the leader's probability) leaves only the argmax, whatever the draw.
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = torch.randn(2, 30, generator=gen)
        seqs = seqs_for([SamplingParams(do_sample=True, temperature=5.0, top_k=1),
                         SamplingParams(do_sample=True, temperature=5.0, top_p=0.01)])
        assert Sampler()(logits, seqs) == [int(logits[0].argmax()), int(logits[1].argmax())]


def test_unseeded_rows_draw_from_the_samplers_own_stream_not_torchs_global_one() -> None:
    # Other code (model init, tests, libraries) draws from torch's global generator; an unseeded request
    # must neither depend on it nor advance it.
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    seqs = seqs_for([SamplingParams(do_sample=True, temperature=2.0)] * 3)
    sampler = Sampler()
    before = torch.get_rng_state()
    sampler(logits, seqs)
    sampler(logits, seqs)
    assert torch.equal(torch.get_rng_state(), before)
