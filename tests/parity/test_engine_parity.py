"""The decoder engine against the parity kit: every chat case, alone and all at once with other traffic.

Prompts are the kit's `input_ids.npy` (batch rows without their left padding), image embeddings come
from our vision encoder on the kit's tile PNGs, and the expected ids are upstream's `generated_ids`
up to and including the stop token (the template separator). Batched runs use chunked prefill, prefix
reuse and (in one variant) a KV cache small enough to force preemptions, so the same greedy ids prove
those paths exact.
Streaming is checked with the kit's real tokenizer: joined text deltas equal the full decode.
"""

from __future__ import annotations

import json

import pytest
import torch

from services.language_decoder.engine import (
    EngineConfig,
    EngineRequest,
    LLMEngine,
    SamplingParams,
)
from services.language_decoder.models import CausalLM, load_language_model
from services.language_decoder.prompt import get_template
from services.language_decoder.tokenizer_loader import Tokenizer, load_tokenizer, stop_token_id
from tests.conftest import Kit, load_kit
from tests.kit_cases import kit_requests, other_traffic

_KIT = load_kit()
_CASE_IDS = [c["id"] for c in _KIT.manifest["chat_cases"]]


@pytest.fixture(scope="module")
def lm(kit: Kit) -> CausalLM:
    return load_language_model(kit.root, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(kit: Kit) -> Tokenizer:
    return load_tokenizer(kit.root)


@pytest.fixture(scope="module")
def stop_id(kit: Kit, tokenizer: Tokenizer) -> int:
    """The id chat() stops on: the separator of the template the kit's config.json names."""
    return stop_token_id(tokenizer, get_template(json.loads(kit.text("config.json"))["template"]))


@pytest.fixture(scope="module")
def features(kit: Kit):
    """Image id -> [tiles * 256, hidden] embeddings from our encoder on the kit's tile PNGs."""
    from services.vision_encoder.model import load_vision_encoder

    encoder = load_vision_encoder(kit.root, device="cpu", dtype=torch.float32)
    cache: dict[str, torch.Tensor] = {}
    for case in kit.manifest["chat_cases"]:
        for image_id in case["inputs"]["images"]:
            if image_id in cache:
                continue
            pixel_values = torch.from_numpy(kit.pixel_values(image_id))  # exact: from the tile PNGs
            with torch.inference_mode():
                feats = encoder.extract_feature(pixel_values).float()
            cache[image_id] = feats.reshape(-1, feats.shape[-1])
    return cache


BLOCK_SIZE = 16


def engine(lm, tokenizer, **overrides) -> LLMEngine:
    cfg = dict(block_size=BLOCK_SIZE, num_kv_blocks=2048, max_num_seqs=32, max_num_batched_tokens=512,
               max_model_len=_longest_sequence(_KIT, BLOCK_SIZE))
    return LLMEngine(lm, EngineConfig(**{**cfg, **overrides}), tokenizer=tokenizer)


def _longest_sequence(kit: Kit, block_size: int) -> int:
    """Prompt plus new tokens of the kit's longest case (at least 4,096), rounded up to whole blocks."""
    longest = max(
        c["expected"]["input_ids_shape"][1] + c["inputs"]["effective_generate_kwargs"]["max_new_tokens"]
        for c in kit.manifest["chat_cases"]
    )
    return -(-max(longest, 4096) // block_size) * block_size


def noise(kit: Kit, lm) -> list[EngineRequest]:
    return other_traffic(kit, lm.config.hidden_size, int(kit.manifest["model"]["num_image_token"]))


def ids_of(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


@pytest.fixture(scope="module")
def alone(kit, lm, tokenizer, features) -> dict[str, list]:
    """Each kit prompt on its own: an engine without prefix reuse, one request at a time."""
    requests, _ = kit_requests(kit, features)
    eng = engine(lm, tokenizer, enable_prefix_caching=False)
    return {r.request_id: eng.run_until_done([r])[r.request_id] for r in requests}


def test_each_case_alone_matches_upstream(kit, features, alone) -> None:
    _, expected = kit_requests(kit, features)
    assert {rid.split("/")[0] for rid in expected} == set(_CASE_IDS)
    for rid, exp in expected.items():
        assert ids_of(alone[rid]) == exp["ids"], rid
        # The streamed text is upstream's response before its final strip().
        assert "".join(o.text for o in alone[rid]).strip() == exp["response"], rid


@pytest.mark.parametrize("variant", ["roomy", "tight-kv"])
def test_all_cases_at_once_with_other_traffic_equal_each_alone(
    kit, lm, tokenizer, features, alone, variant
) -> None:
    requests, expected = kit_requests(kit, features)
    # Shortest first, whatever the manifest's order: many sequences are admitted together and their
    # decodes outgrow the tight cache (longest first, each would run alone and nothing preempts).
    requests.sort(key=lambda r: (len(r.prompt_token_ids) + r.sampling.max_new_tokens, r.request_id))
    others = noise(kit, lm)
    mixed = [x for pair in zip(requests, others + [None] * len(requests), strict=False) for x in pair if x]
    # tight-kv: just enough blocks for the longest kit sequence (max_model_len) and no more:
    # admission waits on memory and running decodes preempt (recompute) each other.
    longest = max(len(r.prompt_token_ids) + r.sampling.max_new_tokens for r in requests)
    tight_len = -(-longest // BLOCK_SIZE) * BLOCK_SIZE
    tight = {"num_kv_blocks": tight_len // BLOCK_SIZE, "max_model_len": tight_len}
    eng = engine(lm, tokenizer, **(tight if variant == "tight-kv" else {}))
    out = eng.run_until_done(mixed)
    for rid, exp in expected.items():
        assert ids_of(out[rid]) == exp["ids"] == ids_of(alone[rid]), rid
        assert "".join(o.text for o in out[rid]) == "".join(o.text for o in alone[rid]), rid
    if variant == "tight-kv":
        assert eng.scheduler.num_preemptions > 0
    else:  # every kit prompt shares at least the system prompt's blocks with an earlier one
        assert eng.stats.cached_prompt_tokens > 0
    seeded = {r.request_id: r for r in others if r.sampling.do_sample}
    again = engine(lm, tokenizer).run_until_done(seeded.values())
    for rid in seeded:
        assert ids_of(out[rid]) == ids_of(again[rid]), f"seeded {rid} changed with the batch"
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


# --------------------------------------------------------------------------- streaming text

STREAM_TEXTS = [
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL。",
    "Emoji 😀🎉 and ünïcödé, then a tab\tand\nnew lines , spaces before . punctuation !",
    "混合 text 与 数字 12345 and 符号 ©®™ — “quotes” 『括号』 …",
]


def scripted_engine(lm, tokenizer, scripts: dict[str, list[int]], **overrides) -> LLMEngine:
    """An engine whose model 'chooses' each request's scripted token ids (one-hot logits)."""
    eng = engine(lm, tokenizer, **overrides)
    execute = eng.runner.execute

    def run(batch):
        seqs, logits = execute(batch)
        forced = torch.full_like(logits, -1e4)
        for i, seq in enumerate(seqs):
            forced[i, scripts[seq.request_id][seq.num_output_tokens]] = 0.0
        return seqs, forced

    eng.runner.execute = run
    return eng


def test_streamed_cjk_and_byte_fallback_text_equals_full_decode(kit, lm, tokenizer, stop_id) -> None:
    im_end = stop_id
    scripts = {f"s{i}": tokenizer.encode(t, add_bos=False) + [im_end] for i, t in enumerate(STREAM_TEXTS)}
    # Tokens holding part of a character are really there (SentencePiece byte fallback, byte-level BPE
    # pieces of e.g. the emoji): they decode alone to U+FFFD, and deltas must never split a character.
    assert any("\ufffd" in tokenizer.decode([t]) for s in scripts.values() for t in s)
    eng = scripted_engine(lm, tokenizer, scripts)
    prompts = {rid: [1, 100 + i, 200 + i] for i, rid in enumerate(scripts)}
    out = eng.run_until_done(
        EngineRequest(rid, prompts[rid], SamplingParams(max_new_tokens=200, stop_token_ids=(im_end,)))
        for rid in scripts
    )
    for rid, ids in scripts.items():
        assert ids_of(out[rid]) == ids and out[rid][-1].finish_reason == "stop"
        # The stop token ends the stream and is no part of its text (Phi-3's <|end|> is not a special
        # token, so a full decode would show it).
        full = tokenizer.decode(ids[:-1], skip_special_tokens=True)
        deltas = [o.text for o in out[rid]]
        assert "".join(deltas) == full
        assert "\ufffd" not in "".join(deltas)


def test_stop_string_on_cjk_text(kit, lm, tokenizer) -> None:
    ids = tokenizer.encode(STREAM_TEXTS[0], add_bos=False)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    eng = scripted_engine(lm, tokenizer, {"s": ids})
    out = eng.run_until_done(
        [EngineRequest("s", [1, 5, 6], SamplingParams(max_new_tokens=len(ids), stop=("联合",)))]
    )
    assert "".join(o.text for o in out["s"]) == full[: full.index("联合")]
    assert out["s"][-1].finish_reason == "stop" and len(ids_of(out["s"])) < len(ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU path, CUDA graphs)")
@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graphs", "eager"])
def test_gpu_engine_fp32_matches_upstream(kit, tokenizer, features, graphs) -> None:
    lm_gpu = load_language_model(kit.root, device="cuda", dtype=torch.float32)
    requests, expected = kit_requests(kit, features)
    eng = engine(lm_gpu, tokenizer, device="cuda", use_cuda_graphs=graphs)
    out = eng.run_until_done(requests + noise(kit, lm_gpu))
    for rid, exp in expected.items():
        assert ids_of(out[rid]) == exp["ids"], rid
    assert (eng.runner.graphs is not None) == graphs
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
