"""Edge cases of the internlm2-chat prompt rules and of the streaming detokenizer.

The template tests need no kit. The IncrementalDecoder tests use the tokenizer of the kit named by
PARITY_KIT and look every id up by its piece text, so they hold for any kit's vocabulary.
"""

from __future__ import annotations

import random

import pytest

from services.language_decoder.prompt import (
    IMG_CONTEXT_TOKEN,
    SYSTEM_MESSAGE,
    build_batch_prompts,
    build_chat_prompt,
    expand_image_placeholders,
    extract_response,
    image_block,
    render_conversation,
    video_question,
)
from services.language_decoder.tokenizer import (
    IncrementalDecoder,
    InternLM2Tokenizer,
    clean_up_tokenization,
)

SYS = "<|im_start|>system\n" + SYSTEM_MESSAGE + "<|im_end|>"
OPEN = "<|im_start|>assistant\n"


def user(q: str) -> str:
    return "<|im_start|>user\n" + q + "<|im_end|>"


def answer(a: str) -> str:
    return OPEN + a + "<|im_end|>"


def block(tiles: int, per_tile: int = 256) -> str:
    return "<img>" + IMG_CONTEXT_TOKEN * (per_tile * tiles) + "</img>"


# ---------------------------------------------------------------- template


def test_no_images():
    prompt, question = build_chat_prompt("Hello, who are you?")
    assert prompt == SYS + user("Hello, who are you?") + OPEN
    assert question == "Hello, who are you?"
    assert "\n<|im_start|>" not in prompt  # sep "<|im_end|>" has no newline (InternVL 2.0)


def test_text_only_keeps_literal_image_placeholder():
    # without pixel values upstream replaces nothing: "<image>" stays text
    prompt, question = build_chat_prompt("What does <image> mean?")
    assert prompt == SYS + user("What does <image> mean?") + OPEN
    assert question == "What does <image> mean?"


def test_images_without_placeholder_prepend_on_first_round():
    prompt, question = build_chat_prompt("Describe it.", num_patches_list=[3])
    assert question == "<image>\nDescribe it."
    assert prompt == SYS + user(block(3) + "\nDescribe it.") + OPEN


def test_explicit_placeholder_is_not_prepended_again():
    prompt, question = build_chat_prompt("Look: <image> what is it?", num_patches_list=[1])
    assert question == "Look: <image> what is it?"
    assert prompt == SYS + user("Look: " + block(1) + " what is it?") + OPEN


def test_with_history_no_prepend_and_history_placeholder_is_filled():
    history = [("<image>\nDescribe it.", "A cat.")]
    prompt, question = build_chat_prompt("And its colour?", history=history, num_patches_list=[2])
    assert question == "And its colour?"
    assert (
        prompt == SYS + user(block(2) + "\nDescribe it.") + answer("A cat.") + user("And its colour?") + OPEN
    )


def test_empty_history_list_does_not_prepend():
    # upstream checks `history is None`: [] is not a first round, so no "<image>\n" is added and the
    # image then has no placeholder
    with pytest.raises(ValueError, match="placeholder"):
        build_chat_prompt("Describe it.", history=[], num_patches_list=[1])
    # text only, [] and None give the same prompt
    assert build_chat_prompt("Hi", history=[]) == build_chat_prompt("Hi", history=None)


def test_empty_answer_in_history_renders_without_separator():
    # upstream `if message:` treats "" like None: role only, no <|im_end|>
    prompt = render_conversation(SYSTEM_MESSAGE, [("Hi", "")], "Again?")
    assert prompt == SYS + user("Hi") + OPEN + user("Again?") + OPEN


def test_custom_system_message():
    prompt, _ = build_chat_prompt("Hi", system_message="Be brief.")
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>" + user("Hi") + OPEN


def test_placeholder_count_mismatch_raises():
    with pytest.raises(ValueError):
        expand_image_placeholders("a <image> b <image>", [1])
    with pytest.raises(ValueError):
        expand_image_placeholders("a <image> b", [1, 2])
    with pytest.raises(ValueError):
        build_chat_prompt("Image-1: <image>\nImage-2: <image>\nCompare.", num_patches_list=[4])
    with pytest.raises(ValueError):
        build_chat_prompt("<image>\nOne image.", num_patches_list=[1, 1])


def test_invalid_tile_counts_raise():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            image_block(bad)


def test_expand_replaces_in_order():
    out = expand_image_placeholders("A <image> B <image> C", [2, 1], num_image_token=3)
    assert out == "A " + block(2, 3) + " B " + block(1, 3) + " C"


def test_multi_image_separate_vs_combined():
    question = "Image-1: <image>\nImage-2: <image>\nDescribe the two images."
    separate, q1 = build_chat_prompt(question, num_patches_list=[5, 1])
    assert q1 == question
    assert (
        separate
        == SYS + user("Image-1: " + block(5) + "\nImage-2: " + block(1) + "\nDescribe the two images.") + OPEN
    )
    # upstream num_patches_list=None: all 6 tiles in one block
    combined, q2 = build_chat_prompt("<image>\nDescribe the two images.", num_patches_list=[6])
    assert combined == SYS + user(block(6) + "\nDescribe the two images.") + OPEN
    assert separate.count(IMG_CONTEXT_TOKEN) == combined.count(IMG_CONTEXT_TOKEN) == 6 * 256


def test_video_question():
    q = video_question("What happens?", 3)
    assert q == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat happens?"
    prompt, stored = build_chat_prompt(q, num_patches_list=[1, 1, 1])
    assert stored == q  # already has <image>: nothing prepended
    assert (
        prompt
        == SYS
        + user("Frame1: " + block(1) + "\nFrame2: " + block(1) + "\nFrame3: " + block(1) + "\nWhat happens?")
        + OPEN
    )
    with pytest.raises(ValueError):
        video_question("x", 0)


def test_batch_prompts():
    prompts = build_batch_prompts(["Describe.", "<image>\n描述。"], [1, 2])
    assert prompts == [
        SYS + user(block(1) + "\nDescribe.") + OPEN,
        SYS + user(block(2) + "\n描述。") + OPEN,
    ]
    assert build_batch_prompts(["Hi"], None) == [SYS + user("Hi") + OPEN]
    with pytest.raises(ValueError):
        build_batch_prompts(["a", "b"], [1])
    with pytest.raises(ValueError):  # batch_chat fills one image per question
        build_batch_prompts(["<image> and <image>"], [1])


def test_extract_response():
    assert extract_response("  hello there <|im_end|> junk") == "hello there"
    assert extract_response("\nno end ") == "no end"


# ---------------------------------------------------------------- streaming detokenizer


@pytest.fixture(scope="module")
def tok(kit) -> InternLM2Tokenizer:
    return InternLM2Tokenizer.from_dir(kit.root)


def _stream(tok, ids, skip=True) -> list[str]:
    dec = IncrementalDecoder(tok, skip_special_tokens=skip)
    return [dec.push(i) for i in ids] + [dec.flush()]


def _piece(tok, piece: str) -> int:
    token_id = tok.token_to_id(piece)
    assert tok.id_to_token(token_id) == piece, f"{piece!r} is not in this vocabulary"
    return token_id


def _byte_ids(tok, text: str) -> list[int]:
    return [_piece(tok, f"<0x{b:02X}>") for b in text.encode("utf-8")]


def test_stream_cjk_text(tok):
    text = "你好，请用中文介绍一下你自己。书生多模态大模型，英文名叫InternVL。"
    ids = tok.encode(text, add_bos=False)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in c for c in chunks)
    # no spaces, so nothing is held back for cleanup: all text is out before flush
    assert chunks[-1] == ""
    assert sum(1 for c in chunks if c) >= 5


def test_stream_byte_fallback_characters(tok):
    for text in ("龘", "😀", "é"):
        ids = _byte_ids(tok, text)
        chunks = _stream(tok, ids)
        # nothing until the last byte of the character, then the whole character at once
        assert chunks[:-2] == [""] * (len(ids) - 1)
        assert chunks[-2] == text and chunks[-1] == ""


def test_stream_mixed_text_and_emoji(tok):
    text = "emoji 😀 and rare 龘 characters, 你好！"
    ids = tok.encode(text, add_bos=False)
    assert any(tok.id_to_token(i).startswith("<0x") for i in ids), "expected byte-fallback pieces"
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in c for c in chunks)


def test_stream_invalid_bytes_are_emitted_once(tok):
    # a lone continuation byte and a truncated sequence followed by ASCII: U+FFFD, as a full decode
    ids = _byte_ids(tok, "a") + [_piece(tok, "<0x80>")] + [_piece(tok, "<0xE9>"), _piece(tok, "<0xBE>")]
    ids += tok.encode("ok", add_bos=False)
    full = tok.decode(ids, skip_special_tokens=True)
    assert "\ufffd" in full
    assert "".join(_stream(tok, ids)) == full
    # a truncated character at the very end comes out on flush
    tail = _byte_ids(tok, "龘")[:2]
    chunks = _stream(tok, tail)
    assert chunks[:-1] == ["", ""] and chunks[-1] == tok.decode(tail, skip_special_tokens=True)


def test_stream_applies_upstream_cleanup(tok):
    # upstream decode deletes the space in " ." / " 's" / " n't" ...; the stream must agree even
    # though the space arrives before the token that deletes it
    text = "Hello , world . It 's a cat ! Do n't go ? They 've said ' yes ' ."
    ids = tok.encode(text, add_bos=False)
    full = tok.decode(ids, skip_special_tokens=True)
    assert full == clean_up_tokenization(text)
    assert "".join(_stream(tok, ids)) == full


def test_stream_skips_special_tokens(tok):
    ids = [tok.bos_id, *tok.encode("你好 world", add_bos=False), tok.img_context_id, tok.im_end_id]
    ids += [tok.pad_id, tok.pad_id]
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in "".join(chunks)


def test_stream_keeps_special_tokens_when_asked(tok):
    words = tok.encode("hi there", add_bos=False)
    ids = [tok.bos_id, *words, tok.im_end_id, *words]
    out = "".join(_stream(tok, ids, skip=False))
    run = tok.decode(words, skip_special_tokens=True)
    assert out == "<s>" + run + "<|im_end|>" + run


def test_stream_push_after_flush_raises(tok):
    dec = IncrementalDecoder(tok)
    dec.push(tok.encode("a", add_bos=False)[-1])
    dec.flush()
    with pytest.raises(RuntimeError):
        dec.push(tok.bos_id)
    with pytest.raises(IndexError):
        IncrementalDecoder(tok).push(tok.vocab_size)


def test_stream_random_sequences_match_full_decode(tok):
    """Random ids, biased to the pieces that make decoding stateful: byte-fallback bytes (valid,
    truncated and invalid UTF-8), "▁", and the characters of the cleanup rules."""
    rng = random.Random(1234)
    bytes_ = (0x20, 0x27, 0x2E, 0x6E, 0x74, 0x80, 0x98, 0x9F, 0xBE, 0xE9, 0xF0, 0xF6)
    pool = [_piece(tok, f"<0x{b:02X}>") for b in bytes_]  # byte_fallback: all 256 exist
    for piece in ("▁", "▁▁", ".", "'", "n", "t", "s", "e", ",", "▁n"):  # whichever this vocab has
        token_id = tok.token_to_id(piece)
        if tok.id_to_token(token_id) == piece:
            pool.append(token_id)
    specials = sorted(tok.special_ids)
    for _ in range(3000):
        ids = []
        for _ in range(rng.randint(0, 20)):
            r = rng.random()
            if r < 0.75:
                ids.append(rng.choice(pool))
            elif r < 0.85:
                ids.append(rng.choice(specials))
            else:
                ids.append(rng.randrange(tok.vocab_size))
        assert "".join(_stream(tok, ids)) == tok.decode(ids, skip_special_tokens=True), ids
        # with special tokens kept: each special's text, each run between them as a skip decode
        want, run = "", []
        for i in ids:
            if i in tok.special_ids:
                want += tok.decode(run, skip_special_tokens=True) + tok.id_to_token(i)
                run = []
            else:
                run.append(i)
        want += tok.decode(run, skip_special_tokens=True)
        assert "".join(_stream(tok, ids, skip=False)) == want, ids
