"""Prompt-template parity against the kit named by PARITY_KIT: each chat case's prompt is rebuilt
from its `inputs` (question(s), history, tile counts from the manifest's images / video) with the
template the kit's config.json names, and must equal the kit's prompt file(s) byte for byte, with the
history upstream `chat()` returned.
"""

from __future__ import annotations

import json
import re

import pytest

from services.language_decoder.prompt import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    SYSTEM_MESSAGE,
    ChatTemplate,
    build_batch_prompts,
    build_chat_prompt,
    get_template,
    video_question,
)
from tests.conftest import load_kit

_KIT = load_kit()  # collection time: a broken PARITY_KIT is a collection error, never a skip
_CHAT_CASE_IDS = [case["id"] for case in _KIT.manifest["chat_cases"]]
_BATCH_CASES = [c["id"] for c in _KIT.manifest["chat_cases"] if c["api"] == "batch_chat"]
_VIDEO_CASES = [c["id"] for c in _KIT.manifest["chat_cases"] if c["inputs"]["images"] == ["video"]]


@pytest.fixture(scope="module")
def template(kit) -> ChatTemplate:
    return get_template(json.loads(kit.text("config.json"))["template"])


def _num_image_token(kit) -> int:
    return int(kit.manifest["model"]["num_image_token"])


def _tiles_per_image(kit, image_ids: list[str]) -> list[int]:
    """Tile count of each listed input, from the manifest (a video counts its frames' tiles)."""
    counts = []
    for image_id in image_ids:
        if image_id == "video":
            counts.append(sum(kit.manifest["video"]["num_patches_list"]))
        else:
            assert image_id in kit.images, f"unknown image {image_id!r}"
            counts.append(int(kit.images[image_id]["num_tiles"]))
    return counts


def _chat_num_patches_list(kit, inputs) -> list[int] | None:
    """What `chat()` ends up using: the given list, else all of pixel_values in one block."""
    if not inputs["images"]:
        assert inputs["pixel_values_num_tiles"] is None
        assert inputs["num_patches_list"] is None
        return None
    total = sum(_tiles_per_image(kit, inputs["images"]))
    assert inputs["pixel_values_num_tiles"] == total
    if inputs["num_patches_list"] is not None:
        assert sum(inputs["num_patches_list"]) == total
        return list(inputs["num_patches_list"])
    return [total]


def _history(kit, inputs) -> list[tuple[str, str]] | None:
    source = inputs["history_from_case"]
    if source is None:
        return None if inputs["history"] is None else [tuple(turn) for turn in inputs["history"]]
    earlier = kit.chat_cases[source]["expected"]["history"]
    assert earlier == inputs["history"], f"history_from_case {source} disagrees with inputs.history"
    return [tuple(turn) for turn in earlier]


def _compact(prompt: str) -> str:
    return re.sub(
        f"(?:{re.escape(IMG_CONTEXT_TOKEN)})+",
        lambda m: f"{IMG_CONTEXT_TOKEN}*{len(m.group()) // len(IMG_CONTEXT_TOKEN)}",
        prompt,
    )


def test_kit_has_cases():
    assert _CHAT_CASE_IDS, "manifest has no chat_cases"


def test_conversation_constants(kit, template):
    conv = kit.manifest["conversation"]
    assert conv["template"] == template.name == kit.manifest["model"]["template"]
    assert conv["system_message"] == SYSTEM_MESSAGE == template.system_message
    # the stop token chat() used is the template's separator
    stop_ids = {c["inputs"]["effective_generate_kwargs"]["eos_token_id"] for c in kit.manifest["chat_cases"]}
    assert stop_ids == {kit.manifest["special_token_ids"][template.sep]}


@pytest.mark.parametrize("case_id", _CHAT_CASE_IDS)
def test_prompt_matches_kit(kit, template, case_id):
    case = kit.chat_cases[case_id]
    inputs, expected = case["inputs"], case["expected"]
    files = expected["prompt_files"]
    assert files, f"{case_id}: no prompt files"
    if case["api"] == "batch_chat":
        questions = inputs["questions"]
        num_patches_list = inputs["num_patches_list"]
        assert num_patches_list == _tiles_per_image(kit, inputs["images"])
        prompts = build_batch_prompts(questions, num_patches_list, num_image_token=_num_image_token(kit),
                                      template=template)
        assert expected["history"] is None
    elif case["api"] == "chat":
        history = _history(kit, inputs)
        prompt, stored_question = build_chat_prompt(
            inputs["question"],
            history=history,
            num_patches_list=_chat_num_patches_list(kit, inputs),
            num_image_token=_num_image_token(kit),
            template=template,
        )
        prompts = [prompt]
        # chat() appends (question as modified, response) to the history it returns
        want_history = [list(t) for t in (history or [])] + [[stored_question, expected["responses"][0]]]
        assert want_history == expected["history"]
    else:
        raise AssertionError(f"{case_id}: unknown api {case['api']!r}")

    assert len(prompts) == len(files)
    for prompt, rel, compact, n_ctx in zip(
        prompts, files, expected["prompt_compact"], expected["num_img_context_tokens"], strict=True
    ):
        assert prompt == kit.text(rel), rel
        assert _compact(prompt) == compact
        assert prompt.count(IMG_CONTEXT_TOKEN) == n_ctx


@pytest.mark.parametrize("case_id", _VIDEO_CASES)
def test_video_question_prefix(kit, case_id):
    inputs = kit.chat_cases[case_id]["inputs"]
    frames = kit.manifest["video"]["num_patches_list"]
    assert inputs["num_patches_list"] == frames
    question = inputs["question"] if inputs["history"] is None else inputs["history"][0][0]
    prefix = video_question("", len(frames))
    assert question.startswith(prefix)
    assert video_question(question[len(prefix) :], len(frames)) == question
    assert question.count(IMAGE_PLACEHOLDER) == len(frames)


def test_kit_covers_template_rules(kit):
    """The kit exercises the rules these tests are meant to pin down."""
    cases = kit.manifest["chat_cases"]
    chat = [c for c in cases if c["api"] == "chat"]
    assert _BATCH_CASES, "no batch_chat case"
    assert _VIDEO_CASES, "no video case"
    first_rounds = [c for c in chat if c["inputs"]["history"] is None and c["inputs"]["images"]]
    assert any(IMAGE_PLACEHOLDER not in c["inputs"]["question"] for c in first_rounds), "no implicit <image>"
    assert any(c["inputs"]["history"] for c in chat), "no multi-round case"
    assert any(c["inputs"]["num_patches_list"] and len(c["inputs"]["num_patches_list"]) > 1 for c in chat)
    assert any(len(c["inputs"]["images"]) > 1 and c["inputs"]["num_patches_list"] is None for c in chat)
