"""The sampling warpers at their exact boundaries (HF's rules), where an off-by-one changes which tokens may be drawn.

Probabilities are powers of two, so every softmax and cumulative sum below is exact in float32 and each
case sits exactly on its boundary. Everything goes through `process_logits` and `sample` (what the
engine's sampler calls); `kept` lists the token ids a draw may still pick.
"""

from __future__ import annotations

import math

import torch

from services.language_decoder.sampling import process_logits, sample


def kept(probs: list[float], **warpers) -> list[int]:
    logits = torch.tensor([probs]).log()
    scores = process_logits(logits, do_sample=True, **warpers)
    return torch.isfinite(scores)[0].nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------- top-p


def test_top_p_drops_a_tail_whose_mass_is_exactly_one_minus_top_p() -> None:
    # Ascending: 0.25, 0.25, 0.5. The first 0.25 is a tail of mass exactly 1 - 0.75: dropped (HF: <=).
    survivors = kept([0.5, 0.25, 0.25], top_p=0.75)
    assert len(survivors) == 2 and 0 in survivors


def test_top_p_exact_boundary_can_leave_a_single_token() -> None:
    # The two 0.25s add up to exactly 1 - 0.5: both dropped, the 0.5 alone remains.
    assert kept([0.5, 0.25, 0.25], top_p=0.5) == [0]
    # Just above the boundary the second 0.25 is needed to reach the mass.
    assert len(kept([0.5, 0.25, 0.25], top_p=0.5 + 1e-3)) == 2


def test_top_p_one_filters_nothing() -> None:
    # A token whose probability underflows to 0 is still drawable-in-principle (finite score) with top_p 1.
    logits = torch.tensor([[0.0, -200.0]])
    assert torch.isfinite(process_logits(logits, do_sample=True, top_p=1.0)).all()
    assert kept([0.5, 0.25, 0.125, 0.125], top_p=1.0) == [0, 1, 2, 3]


def test_top_p_always_keeps_the_most_likely_token() -> None:
    assert kept([0.25, 0.25, 0.5], top_p=1e-6) == [2]


# ---------------------------------------------------------------------------------------- top-k


def test_top_k_keeps_exactly_k_and_ties_at_the_kth_value() -> None:
    assert kept([0.5, 0.25, 0.125, 0.125], top_k=2) == [0, 1]  # the k-th itself stays
    assert kept([0.5, 0.25, 0.125, 0.125], top_k=3) == [0, 1, 2, 3]  # a tie with the k-th stays too (HF)
    assert kept([0.5, 0.25, 0.125, 0.125], top_k=1) == [0]


def test_top_k_zero_or_beyond_the_vocabulary_filters_nothing() -> None:
    assert kept([0.5, 0.25, 0.125, 0.125], top_k=0) == [0, 1, 2, 3]
    assert kept([0.5, 0.25, 0.125, 0.125], top_k=4) == [0, 1, 2, 3]
    assert kept([0.5, 0.25, 0.125, 0.125], top_k=5) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------- temperature


def test_temperature_divides_the_logits_on_both_sides_of_one() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert process_logits(logits, do_sample=True, temperature=0.5).tolist() == [[4.0, -2.0, 1.0]]
    assert process_logits(logits, do_sample=True, temperature=2.0).tolist() == [[1.0, -0.5, 0.25]]
    assert process_logits(logits, do_sample=True, temperature=1.0).tolist() == logits.tolist()


def test_temperature_is_applied_before_top_p() -> None:
    # At temperature 2 the probabilities flatten to 0.41, 0.29, 0.29: the 0.5 mass now needs two tokens.
    assert kept([0.5, 0.25, 0.25], top_p=0.5) == [0]
    assert len(kept([0.5, 0.25, 0.25], top_p=0.5, temperature=2.0)) == 2
    # ... and sharpened at temperature 0.5 (0.67, 0.17, 0.17) one token covers 0.6 where two were needed.
    assert len(kept([0.5, 0.25, 0.25], top_p=0.6)) == 2
    assert kept([0.5, 0.25, 0.25], top_p=0.6, temperature=0.5) == [0]


def test_greedy_applies_no_warper() -> None:
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    scores = process_logits(logits, do_sample=False, temperature=0.5, top_k=1, top_p=0.1)
    assert all(math.isfinite(v) for v in scores[0].tolist())
    torch.testing.assert_close(scores, logits)


# ---------------------------------------------------------------------------------------- repetition penalty, defaults


def test_repetition_penalty_divides_positive_logits_below_one_too() -> None:
    logits = torch.tensor([[0.5, 0.0, -0.5, 3.0]])
    out = process_logits(logits, repetition_penalty=2.0, prev_tokens=torch.tensor([[0, 1, 2]]))
    assert out.tolist() == [[0.25, 0.0, -1.0, 3.0]]
    # Without previous tokens there is nothing to penalise.
    assert process_logits(logits, repetition_penalty=2.0).tolist() == logits.tolist()


def test_defaults_are_greedy_and_change_nothing() -> None:
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    prev = torch.tensor([[0]])
    torch.testing.assert_close(process_logits(logits, temperature=0.5, top_k=1, top_p=0.1), logits)
    torch.testing.assert_close(process_logits(logits, prev_tokens=prev), logits)
    assert sample(logits).tolist() == [0]
    # Sampling with the defaults draws exactly what sampling with the neutral settings draws.
    rows = torch.randn(64, 50, generator=torch.Generator().manual_seed(3))
    prev = torch.zeros(64, 1, dtype=torch.long)
    draw = lambda **kw: sample(rows, do_sample=True, prev_tokens=prev,  # noqa: E731
                               generator=torch.Generator().manual_seed(5), **kw)
    neutral = draw(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    assert torch.equal(draw(), neutral)
    assert len(set(neutral.tolist())) > 10  # a real draw, not the argmax


def test_sample_applies_top_p() -> None:
    peaked = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).expand(200, 4)
    picks = sample(peaked, do_sample=True, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1}  # token 1 alone holds 0.73 of the mass
