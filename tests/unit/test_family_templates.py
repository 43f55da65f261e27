"""The family's chat templates, as upstream conversation.py (@ 74126371) renders them (SeparatorStyle.MPT)."""

from __future__ import annotations

from services.language_decoder.prompt import (
    HERMES_2,
    INTERNLM2_CHAT,
    PHI3_CHAT,
    SYSTEM_MESSAGE,
    build_batch_prompts,
    build_chat_prompt,
    extract_response,
    get_template,
)


def test_phi3_chat_two_rounds():
    prompt, question = build_chat_prompt("And now?", history=[("Hi", "Hello.")], system_message="Be brief.",
                                         template=PHI3_CHAT)
    assert question == "And now?"
    assert prompt == (
        "<|system|>\nBe brief.<|end|>"
        "<|user|>\nHi<|end|><|assistant|>\nHello.<|end|>"
        "<|user|>\nAnd now?<|end|><|assistant|>\n"
    )


def test_phi3_chat_default_system_message_and_images():
    prompt, question = build_chat_prompt("Describe it.", num_patches_list=[1], num_image_token=2,
                                         template=PHI3_CHAT)
    assert question == "<image>\nDescribe it."
    assert prompt == (
        f"<|system|>\n{SYSTEM_MESSAGE}<|end|><|user|>\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe it.<|end|>"
        "<|assistant|>\n"
    )
    assert build_batch_prompts(["Describe it."], [1], num_image_token=2, template=PHI3_CHAT) == [prompt]


def test_hermes_2_renders_like_internlm2_chat():
    history = [("<image>\nWhat is it?", "A cat.")]
    for question in ("Its colour?", ""):
        assert build_chat_prompt(question, history, [3], template=HERMES_2) == build_chat_prompt(
            question, history, [3], template=INTERNLM2_CHAT
        )
    assert HERMES_2.sep == INTERNLM2_CHAT.sep == "<|im_end|>"


def test_response_is_cut_at_the_templates_separator():
    # phi3's <|end|> is no special token: decode keeps it (" <|end|>"), chat() cuts the answer there
    assert extract_response("A cat. <|end|> <|user|> more", PHI3_CHAT) == "A cat."
    assert extract_response(" A cat.<|im_end|>junk", get_template("Hermes-2")) == "A cat."
