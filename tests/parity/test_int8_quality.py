"""int8 decoder weights on the dev kit: bounds from the measured figures (bench/int8_quality.py) plus 10 %.

Measured on the repository's dev kit copy (docs/benchmarks.md, quality section), int8 weights with fp32
activations against upstream's fp32 goldens. Per case: every greedy token upstream generated (up to
and including <|im_end|>) must be reproduced, and the last prompt position's logits must stay within
the measured max abs difference + 10 % and cosine distance + 10 %. The kit's weights are tiny random
ones (64-wide layers): these bounds guard this implementation, not the quality of int8 InternVL2-8B.
Always the dev kit (the figures are that kit's), whatever PARITY_KIT says.
"""

from __future__ import annotations

import pytest

from bench.int8_quality import DEFAULT_KIT, CaseQuality, measure

# case: (greedy tokens equal to upstream's, max |logit diff|, min cosine) -- measured, then the margin.
BOUNDS = {
    "text_single_round": (24, 0.194, 0.999865),  # measured 0.1763, 0.999878
    "text_second_round": (13, 0.236, 0.999847),  # measured 0.2138, 0.999861
    "text_chinese": (6, 0.176, 0.999853),  # measured 0.1595, 0.999867
    "image_single_round": (2, 0.163, 0.999887),  # measured 0.1473, 0.999898
    "image_round1": (24, 0.168, 0.999873),  # measured 0.1522, 0.999885
    "image_round2": (5, 0.165, 0.999852),  # measured 0.1493, 0.999866
    "multi_image_combined": (24, 0.219, 0.999850),  # measured 0.1984, 0.999864
    "multi_image_separate_round1": (21, 0.147, 0.999925),  # measured 0.1334, 0.999932
    "multi_image_separate_round2": (15, 0.119, 0.999931),  # measured 0.1079, 0.999937
    "batch_chat_two_images": (24, 0.165, 0.999881),  # measured 0.1493, 0.999893
    "video_round1": (4, 0.135, 0.999905),  # measured 0.1226, 0.999914
    "video_round2": (9, 0.133, 0.999913),  # measured 0.1207, 0.999922
}


@pytest.fixture(scope="module")
def quality() -> dict[str, CaseQuality]:
    rows = measure(DEFAULT_KIT)
    print("\nint8 vs upstream fp32 on the dev kit:")
    for r in rows:
        print(f"  {r.case}: {r.matched_tokens}/{r.upstream_tokens} tokens, max abs {r.last_logits_max_abs:.4f}, "
              f"cosine {r.last_logits_cosine:.6f}")
    return {r.case: r for r in rows}


def test_every_case_is_measured(quality: dict[str, CaseQuality]) -> None:
    assert set(quality) == set(BOUNDS)


@pytest.mark.parametrize("case", sorted(BOUNDS))
def test_int8_stays_within_the_measured_bounds(quality: dict[str, CaseQuality], case: str) -> None:
    tokens, max_abs, cosine = BOUNDS[case]
    r = quality[case]
    assert r.matched_tokens >= tokens == r.upstream_tokens, f"diverges from upstream after {r.matched_tokens} tokens"
    assert r.last_logits_max_abs <= max_abs
    assert r.last_logits_cosine >= cosine
    assert r.last_logits_max_abs > 0.01  # the model really ran with int8 weights (fp32 matches to 2e-4)
