"""End-to-end in-process parity: every kit chat case from the raw image/video files to the response text.

This runs the real preprocessing (PIL tiling, decord), both model halves, the tokenizer and the
template, and compares with what upstream's `chat()` / `batch_chat()` returned.
"""

from __future__ import annotations

import pytest

from services.inprocess import GenerationSettings, InternVLChat
from tests.conftest import Kit, load_kit
from tests.kit_cases import case_pixel_values

CASES = load_kit().manifest["chat_cases"]


@pytest.fixture(scope="module")
def model(kit: Kit) -> InternVLChat:
    return InternVLChat.load(kit.root, device="cpu", dtype="fp32")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_chat_case_matches_upstream(kit: Kit, model: InternVLChat, case: dict):
    inputs, expected = case["inputs"], case["expected"]
    gen = inputs["generation_config"]
    settings = GenerationSettings(max_new_tokens=gen["max_new_tokens"], do_sample=gen["do_sample"])
    pixel_values, num_patches_list = case_pixel_values(kit, case)
    if case["api"] == "batch_chat":
        responses = model.batch_chat(inputs["questions"], pixel_values, num_patches_list, settings)
        assert responses == expected["responses"]
        return
    assert case["api"] == "chat", f"unknown api {case['api']!r}"
    history = [tuple(turn) for turn in inputs["history"]] if inputs["history"] is not None else None
    response, new_history = model.chat(inputs["question"], pixel_values, num_patches_list, history, settings)
    assert [response] == expected["responses"]
    assert [list(turn) for turn in new_history] == expected["history"]


def test_kit_has_chat_cases():
    assert CASES, "the kit's manifest lists no chat cases"
