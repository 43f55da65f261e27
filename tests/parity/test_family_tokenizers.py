"""Tokenizers and chat templates of every kit in tests/fixtures/parity (dev + one per family member).

Each kit's tokenizer is loaded from its own files through `load_tokenizer` (InternLM2, Qwen2 byte-level
BPE, Llama-3 byte-level BPE, Phi-3 SentencePiece) and must reproduce upstream's goldens: the manifest's
`tokenizer_cases` (ids, tokens, decode with and without special tokens), and for the chat cases the
prompt rendered with the template the kit's config.json names, its input ids (with batch_chat's left
padding), the stop and pad ids chat() used, and the responses decoded from the generated ids. The
streaming detokenizer must give exactly the full decode, on the goldens and on random ids.
"""

from __future__ import annotations

import functools
import json
import random

import numpy as np
import pytest

from services.language_decoder.bpe_tokenizer import ByteLevelBPETokenizer
from services.language_decoder.llama_tokenizer import LlamaSPTokenizer
from services.language_decoder.prompt import (
    IMG_CONTEXT_TOKEN,
    TEMPLATES,
    build_batch_prompts,
    build_chat_prompt,
    extract_response,
    get_template,
)
from services.language_decoder.tokenizer import IncrementalDecoder, InternLM2Tokenizer, TokenizerError
from services.language_decoder.tokenizer_loader import Tokenizer, load_tokenizer, stop_token_id
from tests.kits import FAMILY_KIT_NAMES, fixture_kit, fixture_kit_names

KITS = fixture_kit_names()
EXPECTED_CLASS = {
    "InternLM2ForCausalLM": InternLM2Tokenizer,
    "Qwen2ForCausalLM": ByteLevelBPETokenizer,
    "LlamaForCausalLM": ByteLevelBPETokenizer,
    "Phi3ForCausalLM": LlamaSPTokenizer,
}


@functools.cache
def _kit(name: str):
    return fixture_kit(name)


@functools.cache
def _tokenizer(name: str):
    return load_tokenizer(_kit(name).root)


def _template(name: str):
    return get_template(json.loads(_kit(name).text("config.json"))["template"])


def _tokenizer_cases() -> list:
    return [
        pytest.param(name, case, id=f"{name}-{index}-{'decode_only' if case.get('decode_only') else 'encode'}")
        for name in KITS
        for index, case in enumerate(_kit(name).manifest["tokenizer_cases"])
    ]


def _chat_cases() -> list:
    return [
        pytest.param(name, case, id=f"{name}-{case['id']}")
        for name in KITS
        for case in _kit(name).manifest["chat_cases"]
    ]


def _stream(tok, ids, skip_special_tokens=True) -> list[str]:
    stream = IncrementalDecoder(tok, skip_special_tokens=skip_special_tokens)
    return [stream.push(i) for i in ids] + [stream.flush()]


def test_every_family_kit_is_a_fixture():
    assert set(FAMILY_KIT_NAMES) <= set(KITS)


@pytest.mark.parametrize("name", KITS)
def test_tokenizer_chosen_from_checkpoint(name):
    kit, tok = _kit(name), _tokenizer(name)
    llm_config = json.loads(kit.text("config.json"))["llm_config"]
    assert type(tok) is EXPECTED_CLASS[llm_config["architectures"][0]]
    assert isinstance(tok, Tokenizer)  # the one interface the decoder uses
    assert tok.vocab_size == kit.manifest["model"]["vocab_size"] == llm_config["vocab_size"]
    for token, token_id in kit.manifest["special_token_ids"].items():
        assert tok.token_to_id(token) == token_id, token
        assert tok.id_to_token(token_id) == token, token_id
    assert tok.img_context_id == kit.manifest["special_token_ids"][IMG_CONTEXT_TOKEN]


@pytest.mark.parametrize(("name", "case"), _tokenizer_cases())
def test_tokenizer_case(name, case):
    tok = _tokenizer(name)
    ids = case["input_ids"]
    if not case.get("decode_only"):
        assert tok.encode(case["text"]) == ids
    assert tok.convert_ids_to_tokens(ids) == case["tokens"]
    assert tok.decode(ids) == case["decode"]
    assert tok.decode(ids, skip_special_tokens=True) == case["decode_skip_special"]
    assert "".join(_stream(tok, ids)) == case["decode_skip_special"]
    if not isinstance(tok, InternLM2Tokenizer):  # InternLM2's stream is exact only without specials
        assert "".join(_stream(tok, ids, skip_special_tokens=False)) == case["decode"]


@pytest.mark.parametrize("name", KITS)
def test_template_from_config(name):
    kit = _kit(name)
    template = _template(name)
    conversation = kit.manifest["conversation"]
    assert template.name == conversation["template"] == kit.manifest["model"]["template"]
    assert template.system_message == conversation["system_message"]
    for case in kit.manifest["chat_cases"]:
        kwargs = case["inputs"]["effective_generate_kwargs"]
        # chat() stops on the template's separator only, and batch_chat pads with the pad token
        assert stop_token_id(_tokenizer(name), template) == kwargs["eos_token_id"], case["id"]
        assert _tokenizer(name).pad_id == kwargs["pad_token_id"], case["id"]


def test_template_registry():
    assert set(TEMPLATES) == {"internlm2-chat", "Hermes-2", "phi3-chat"}
    with pytest.raises(ValueError, match="unknown chat template 'vicuna_v1.1'"):
        get_template("vicuna_v1.1")


def _tiles(kit, image_ids) -> list[int]:
    return [sum(kit.manifest["video"]["num_patches_list"]) if i == "video" else kit.images[i]["num_tiles"]
            for i in image_ids]


def _render(name, case) -> list[str]:
    """The prompt(s) chat() / batch_chat() built for this case, rendered with the kit's template."""
    kit, template = _kit(name), _template(name)
    inputs = case["inputs"]
    num_image_token = kit.manifest["model"]["num_image_token"]
    if case["api"] == "batch_chat":
        return build_batch_prompts(inputs["questions"], inputs["num_patches_list"], num_image_token,
                                   template=template)
    num_patches_list = None
    if inputs["images"]:
        num_patches_list = inputs["num_patches_list"] or [sum(_tiles(kit, inputs["images"]))]
    history = None if inputs["history"] is None else [tuple(turn) for turn in inputs["history"]]
    prompt, _ = build_chat_prompt(inputs["question"], history, num_patches_list, num_image_token,
                                  template=template)
    return [prompt]


@pytest.mark.parametrize(("name", "case"), _chat_cases())
def test_chat_case_prompt_and_ids(name, case):
    kit, tok = _kit(name), _tokenizer(name)
    expected = case["expected"]
    prompts = _render(name, case)
    assert prompts == [kit.text(f) for f in expected["prompt_files"]]
    want_ids = kit.npy(expected["input_ids_file"])
    want_mask = kit.npy(expected["attention_mask_file"])
    for b, prompt in enumerate(prompts):
        row = want_ids[b][want_mask[b].astype(bool)]
        assert tok.encode(prompt) == row.tolist(), f"{case['id']}[{b}]"
        assert int((row == tok.img_context_id).sum()) == expected["num_img_context_tokens"][b]
    ids, mask = tok.encode_batch(prompts, padding_side="left")
    np.testing.assert_array_equal(np.asarray(ids, dtype=np.int64), want_ids)
    np.testing.assert_array_equal(np.asarray(mask, dtype=np.int64), want_mask)


@pytest.mark.parametrize(("name", "case"), _chat_cases())
def test_chat_case_responses(name, case):
    tok, template = _tokenizer(name), _template(name)
    expected = case["expected"]
    for ids, response in zip(expected["generated_ids"], expected["responses"], strict=True):
        text = tok.decode(ids, skip_special_tokens=True)
        assert extract_response(text, template) == response
        assert "".join(_stream(tok, ids)) == text


@pytest.mark.parametrize("name", KITS)
def test_stream_equals_decode_on_random_ids(name):
    tok = _tokenizer(name)
    rng = random.Random(f"stream-{name}")
    modes = (True,) if isinstance(tok, InternLM2Tokenizer) else (True, False)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 24))]
        for skip in modes:
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), (ids, skip)


@pytest.mark.parametrize("name", [n for n in KITS if isinstance(_tokenizer(n), ByteLevelBPETokenizer)])
def test_byte_level_stream_holds_back_partial_characters(name):
    tok = _tokenizer(name)
    ids = tok.encode("😀", add_bos=False)
    assert len(ids) == 4  # one token per UTF-8 byte in these tiny vocabularies
    assert _stream(tok, ids) == ["", "", "", "😀", ""]
    # a broken sequence comes out as U+FFFD once it cannot be completed any more, not before
    broken = ids[:2] + tok.encode("a", add_bos=False)
    assert _stream(tok, broken) == ["", "", "\ufffda", ""]


@pytest.mark.parametrize("name", ["internvl2-4b"])
def test_phi3_role_tokens_swallow_the_newline(name):
    tok = _tokenizer(name)
    # rstrip=True on Phi-3's role tokens: the "\n" phi3-chat puts after them never reaches SentencePiece
    assert tok.encode("<|user|>\nHi<|end|>\n") == tok.encode("<|user|>Hi<|end|>")


def test_unsupported_tokenizer_class_is_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}')
    with pytest.raises(TokenizerError, match="tokenizer_class 'GPT2Tokenizer' is not supported"):
        load_tokenizer(tmp_path)


def test_slow_qwen2_ignores_tokenizer_json(tmp_path):
    """Upstream loads InternVL2-1B's tokenizer with use_fast=False: vocab.json + merges.txt, whatever
    tokenizer.json says (here another kit's, which would encode differently)."""
    kit = _kit("internvl2-1b")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (tmp_path / name).write_bytes(kit.path(name).read_bytes())
    (tmp_path / "tokenizer.json").write_bytes(_kit("internvl2-76b").path("tokenizer.json").read_bytes())
    tok = load_tokenizer(tmp_path)
    for case in kit.manifest["tokenizer_cases"]:
        if not case.get("decode_only"):
            assert tok.encode(case["text"]) == case["input_ids"]
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(TokenizerError, match="has no merges.txt"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["dev", "internvl2-1b"])
def test_stop_token_must_be_a_token(name):
    with pytest.raises(TokenizerError, match="'<\\|end\\|>'"):
        stop_token_id(_tokenizer(name), get_template("phi3-chat"))
