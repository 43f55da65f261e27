"""Tokenizer parity against the kit named by PARITY_KIT (upstream slow InternLM2Tokenizer goldens).

Every id, token and string comes from the kit (manifest `tokenizer_cases`, `special_token_ids`,
`chat_cases` and the case files), so a kit with another vocabulary is checked the same way.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.language_decoder.prompt import (
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    extract_response,
)
from services.language_decoder.tokenizer import IncrementalDecoder
from services.language_decoder.tokenizer_loader import Tokenizer, load_tokenizer
from tests.conftest import load_kit

_KIT = load_kit()  # collection time: a broken PARITY_KIT is a collection error, never a skip
_TOKENIZER_CASES = list(enumerate(_KIT.manifest["tokenizer_cases"]))
_CHAT_CASE_IDS = [case["id"] for case in _KIT.manifest["chat_cases"]]


def _case_label(item) -> str:
    index, case = item
    what = "decode_only" if case.get("decode_only") else repr(case["text"])[:40]
    return f"{index}-{what}"


@pytest.fixture(scope="module")
def tok(kit) -> Tokenizer:
    return load_tokenizer(kit.root)  # the class the checkpoint names, as the services load it


def test_kit_has_cases(kit):
    assert _TOKENIZER_CASES, "manifest has no tokenizer_cases"
    assert any(not c.get("decode_only") for _, c in _TOKENIZER_CASES), "no encode cases"
    assert _CHAT_CASE_IDS, "manifest has no chat_cases"


def test_vocab_sizes(tok, kit):
    model = kit.manifest["model"]
    # The vocabulary before the added tokens: `sp_vocab_size` in the schema, `base_vocab_size` in the
    # family kits (whose tokenizers are not all SentencePiece).
    base = model.get("sp_vocab_size", model.get("base_vocab_size"))
    if base is None:
        kit.lacks("model.sp_vocab_size (or base_vocab_size)")
    assert tok.sp_vocab_size == base
    assert tok.vocab_size == model["vocab_size"]


def test_special_token_ids(tok, kit):
    ids = kit.manifest["special_token_ids"]
    assert ids, "manifest has no special_token_ids"
    for token, token_id in ids.items():
        assert tok.token_to_id(token) == token_id, token
        assert tok.id_to_token(token_id) == token, token_id
    assert tok.bos_id == ids["<s>"]
    assert tok.eos_id == ids["</s>"]
    assert tok.unk_id == ids["<unk>"]
    assert tok.im_start_id == ids[IM_START_TOKEN]
    assert tok.im_end_id == ids[IM_END_TOKEN]
    assert tok.img_start_id == ids[IMG_START_TOKEN]
    assert tok.img_end_id == ids[IMG_END_TOKEN]
    assert tok.img_context_id == ids[IMG_CONTEXT_TOKEN]
    # every chat case generated with eos = <|im_end|> and pad = the tokenizer's pad token
    for case in kit.manifest["chat_cases"]:
        kwargs = case["inputs"]["effective_generate_kwargs"]
        assert kwargs["eos_token_id"] == tok.im_end_id, case["id"]
        assert kwargs["pad_token_id"] == tok.pad_id, case["id"]


@pytest.mark.parametrize("item", _TOKENIZER_CASES, ids=_case_label)
def test_tokenizer_case(tok, item):
    _, case = item
    ids = case["input_ids"]
    if not case.get("decode_only"):
        assert tok.encode(case["text"]) == ids
    assert tok.convert_ids_to_tokens(ids) == case["tokens"]
    assert tok.decode(ids) == case["decode"]
    assert tok.decode(ids, skip_special_tokens=True) == case["decode_skip_special"]


def test_tokenize_matches_encode(tok):
    # tokenize() gives raw pieces ("[UNUSED_TOKEN_145]" where the ids say <|im_end|>): compare by id
    for _, case in _TOKENIZER_CASES:
        if case.get("decode_only"):
            continue
        pieces = tok.tokenize(case["text"])
        assert [tok.token_to_id(p) for p in pieces] == case["input_ids"][1:]


def _prompts(kit, case) -> list[str]:
    files = case["expected"]["prompt_files"]
    assert files, f"{case['id']}: no prompt files"
    return [kit.text(f) for f in files]


@pytest.mark.parametrize("case_id", _CHAT_CASE_IDS)
def test_prompt_encodes_to_input_ids(tok, kit, case_id):
    case = kit.chat_cases[case_id]
    expected = case["expected"]
    want_ids = kit.npy(expected["input_ids_file"])
    want_mask = kit.npy(expected["attention_mask_file"])
    assert list(want_ids.shape) == expected["input_ids_shape"]
    prompts = _prompts(kit, case)
    assert len(prompts) == want_ids.shape[0]
    for b, prompt in enumerate(prompts):
        row = want_ids[b][want_mask[b].astype(bool)]
        assert tok.encode(prompt) == row.tolist(), f"{case_id}[{b}]"
        assert int((row == tok.img_context_id).sum()) == expected["num_img_context_tokens"][b]
    # the whole batch, left-padded with the pad id as batch_chat does (a no-op for one prompt)
    ids, mask = tok.encode_batch(prompts, padding_side="left")
    np.testing.assert_array_equal(np.asarray(ids, dtype=np.int64), want_ids)
    np.testing.assert_array_equal(np.asarray(mask, dtype=np.int64), want_mask)


@pytest.mark.parametrize("case_id", _CHAT_CASE_IDS)
def test_generated_ids_decode_to_responses(tok, kit, case_id):
    expected = kit.chat_cases[case_id]["expected"]
    generated, responses = expected["generated_ids"], expected["responses"]
    assert len(generated) == len(responses)
    for ids, response in zip(generated, responses, strict=True):
        text = tok.decode(ids, skip_special_tokens=True)
        assert extract_response(text) == response
        # streaming the same ids gives the same text, piece by piece
        stream = IncrementalDecoder(tok)
        chunks = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(chunks) == text
