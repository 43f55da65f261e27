"""Tokenizer parity against the kit named by PARITY_KIT (upstream tokenizer goldens).

Every id, token and string comes from the kit (manifest `tokenizer_cases`, `special_token_ids`,
`chat_cases` and the case files; the roles of BOS/EOS/UNK from its tokenizer files; the stop token from
the template its config.json names), so a kit with another tokenizer is checked the same way.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.language_decoder.prompt import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    ChatTemplate,
    extract_response,
    get_template,
)
from services.language_decoder.tokenizer import IncrementalDecoder
from services.language_decoder.tokenizer_base import token_content
from services.language_decoder.tokenizer_loader import Tokenizer, load_tokenizer, stop_token_id
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


@pytest.fixture(scope="module")
def template(kit) -> ChatTemplate:
    return get_template(json.loads(kit.text("config.json"))["template"])


def _kit_special_token(kit, role: str) -> str | None:
    """The kit's `bos_token` / `eos_token` / `unk_token` (tokenizer_config.json, else
    special_tokens_map.json); None where the tokenizer has none (Qwen2 has no BOS)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = kit.path(name)
        if path.is_file():
            value = token_content(json.loads(path.read_text(encoding="utf-8")).get(role))
            if value is not None:
                return value
    return None


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
    assert tok.base_vocab_size == base
    assert tok.vocab_size == model["vocab_size"]


def test_special_token_ids(tok, kit, template):
    ids = kit.manifest["special_token_ids"]
    assert ids, "manifest has no special_token_ids"
    for token, token_id in ids.items():
        assert tok.token_to_id(token) == token_id, token
        assert tok.id_to_token(token_id) == token, token_id
    for role, actual in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        name = _kit_special_token(kit, role)
        assert actual == (None if name is None else ids.get(name, tok.token_to_id(name))), role
    unk = _kit_special_token(kit, "unk_token")
    if unk is not None:  # SentencePiece tokenizers; byte-level BPE has no unknown token
        assert tok.unk_token == unk and tok.token_to_id(unk) == ids[unk]
    assert tok.token_to_id(IMG_START_TOKEN) == ids[IMG_START_TOKEN]
    assert tok.token_to_id(IMG_END_TOKEN) == ids[IMG_END_TOKEN]
    assert tok.img_context_id == ids[IMG_CONTEXT_TOKEN]
    # every chat case generated with eos = the template's separator (as chat() sets it) and pad = the
    # tokenizer's pad token
    for case in kit.manifest["chat_cases"]:
        kwargs = case["inputs"]["effective_generate_kwargs"]
        assert kwargs["eos_token_id"] == stop_token_id(tok, template), case["id"]
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
    # tokenize() gives raw pieces ("[UNUSED_TOKEN_145]" where the ids say <|im_end|>): compare by id,
    # after the ids the tokenizer puts in front of every text (BOS, if it adds one)
    prefix = len(tok.encode(""))
    for _, case in _TOKENIZER_CASES:
        if case.get("decode_only"):
            continue
        pieces = tok.tokenize(case["text"])
        assert [tok.token_to_id(p) for p in pieces] == case["input_ids"][prefix:]


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
def test_generated_ids_decode_to_responses(tok, kit, template, case_id):
    expected = kit.chat_cases[case_id]["expected"]
    generated, responses = expected["generated_ids"], expected["responses"]
    assert len(generated) == len(responses)
    for ids, response in zip(generated, responses, strict=True):
        text = tok.decode(ids, skip_special_tokens=True)
        assert extract_response(text, template) == response
        # streaming the same ids gives the same text, piece by piece
        stream = IncrementalDecoder(tok)
        chunks = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(chunks) == text
