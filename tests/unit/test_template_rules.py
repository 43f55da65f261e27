"""Defaults and error messages of the prompt builders (prompt.py), pinned where a mutation audit
(`make mutate GROUPS=template`) found them untested: the template's own system message when none is
given, a caller's system message in batch prompts, and messages that state the counts they compare."""

from __future__ import annotations

import pytest

from services.language_decoder.prompt import (
    HERMES_2,
    INTERNLM2_CHAT,
    PHI3_CHAT,
    build_batch_prompts,
    build_chat_prompt,
    expand_image_placeholders,
    get_template,
    image_block,
    video_question,
)


@pytest.mark.parametrize("template", [INTERNLM2_CHAT, HERMES_2, PHI3_CHAT], ids=lambda t: t.name)
def test_no_system_message_means_the_templates_own(template):
    expected_start = template.system_template.format(system_message=template.system_message) + template.sep
    rendered = template.render([(template.roles[0], "hi"), (template.roles[1], None)])
    assert rendered.startswith(expected_start)
    prompt, _ = build_chat_prompt("hi", template=template)
    assert prompt.startswith(expected_start)
    (batch_prompt,) = build_batch_prompts(["hi"], None, template=template)
    assert batch_prompt.startswith(expected_start)
    assert "None" not in rendered + prompt + batch_prompt


def test_batch_prompts_carry_the_callers_system_message():
    prompts = build_batch_prompts(["a", "b"], [1, 2], num_image_token=1, system_message="Be terse.")
    for prompt in prompts:
        assert prompt.startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert prompts[1].count("<IMG_CONTEXT>") == 2


def test_an_empty_system_message_is_kept_empty_not_replaced():
    prompt, _ = build_chat_prompt("hi", system_message="")
    assert prompt.startswith("<|im_start|>system\n<|im_end|>")


def test_batch_count_mismatch_names_both_counts():
    with pytest.raises(ValueError, match=r"^2 questions but 1 tile counts$"):
        build_batch_prompts(["a", "b"], [1])


@pytest.mark.parametrize(("prompt", "counts", "message"), [
    ("<image> and <image>", [1], "prompt has 2 <image> placeholder(s) but 1 image(s) were given"),
    ("no image", [1, 1], "prompt has 0 <image> placeholder(s) but 2 image(s) were given"),
])
def test_placeholder_mismatch_names_both_counts(prompt, counts, message):
    with pytest.raises(ValueError) as info:
        expand_image_placeholders(prompt, counts, num_image_token=1)
    assert str(info.value).startswith(message)


def test_unknown_template_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"^unknown chat template 'chatml': this server supports "
                                          r"Hermes-2, internlm2-chat, phi3-chat$"):
        get_template("chatml")


@pytest.mark.parametrize("bad", [0, -1, True, 1.0])
def test_image_block_message_names_the_bad_count(bad):
    with pytest.raises(ValueError, match=rf"^tile count must be a positive int, got {bad!r}$"):
        image_block(bad)


def test_video_question_one_frame_and_zero():
    assert video_question("What?", 1) == "Frame1: <image>\nWhat?"
    with pytest.raises(ValueError, match=r"^num_frames must be >= 1, got 0$"):
        video_question("What?", 0)
