"""Every other family kit of the fixtures, the way the default kit is checked (issue #18, Tests).

The parity suite runs the kit PARITY_KIT names (the dev kit by default) through every parity test;
this module runs each other kit in tests/fixtures/parity (InternVL2-1B: Qwen2, -4B: Phi-3, -26B:
InternViT-6B + InternLM2, -Llama3-76B: Llama) through the two decoding paths that matter, so `make
test` covers the whole family:

- in-process: upstream's `chat()` / `batch_chat()` from the raw image/video files (preprocessing, both
  model halves, the kit's tokenizer and template) against the responses upstream returned;
- the serving engine: every case's prompt at once, interleaved with random traffic (chunked prefill,
  prefix reuse, sampled neighbours), against upstream's greedy ids and the streamed text.

The gateway path (real processes) is tests/integration/test_family_end_to_end.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

from services.inprocess import GenerationSettings, InternVLChat
from services.language_decoder.engine import EngineConfig, LLMEngine
from services.language_decoder.models import load_language_model
from services.language_decoder.tokenizer_loader import load_tokenizer
from tests.conftest import Kit, load_kit
from tests.kit_cases import case_pixel_values, kit_requests, other_traffic
from tests.kits import FAMILY_KIT_NAMES, fixture_kit

_DEFAULT_ROOT = load_kit().root.resolve()
# The kits the parity suite does not already run (it runs the PARITY_KIT one).
KITS = [name for name in FAMILY_KIT_NAMES if fixture_kit(name).root.resolve() != _DEFAULT_ROOT]
CASES = [
    pytest.param(name, case["id"], id=f"{name}-{case['id']}")
    for name in KITS
    for case in fixture_kit(name).manifest["chat_cases"]
]


def test_every_family_kit_is_covered() -> None:
    assert set(KITS) | {load_kit().name} >= set(FAMILY_KIT_NAMES), (KITS, load_kit().name)


@functools.cache
def _kit(name: str) -> Kit:
    return fixture_kit(name)


@functools.cache
def _chat(name: str) -> InternVLChat:
    return InternVLChat.load(_kit(name).root, device="cpu", dtype="fp32")


@pytest.mark.parametrize(("kit_name", "case_id"), CASES)
def test_chat_case_in_process(kit_name: str, case_id: str) -> None:
    kit, model = _kit(kit_name), _chat(kit_name)
    case = kit.case(case_id)
    inputs, expected = case["inputs"], case["expected"]
    gen = inputs["generation_config"]
    settings = GenerationSettings(max_new_tokens=gen["max_new_tokens"], do_sample=gen["do_sample"])
    pixel_values, num_patches_list = case_pixel_values(kit, case)
    if case["api"] == "batch_chat":
        assert model.batch_chat(inputs["questions"], pixel_values, num_patches_list, settings) == expected["responses"]
        return
    history = [tuple(turn) for turn in inputs["history"]] if inputs["history"] is not None else None
    response, new_history = model.chat(inputs["question"], pixel_values, num_patches_list, history, settings)
    assert [response] == expected["responses"]
    assert [list(turn) for turn in new_history] == expected["history"]


def _features(kit: Kit, model: InternVLChat) -> dict[str, torch.Tensor]:
    """Image id -> [tiles * 256, hidden] embeddings from our encoder on the kit's tile PNGs."""
    out: dict[str, torch.Tensor] = {}
    for case in kit.manifest["chat_cases"]:
        for media in case["inputs"]["images"]:
            if media not in out:
                with torch.inference_mode():
                    feats = model.vision.extract_feature(torch.from_numpy(kit.pixel_values(media))).float()
                out[media] = feats.reshape(-1, feats.shape[-1])
    return out


@pytest.mark.parametrize("kit_name", KITS)
def test_engine_all_cases_with_other_traffic(kit_name: str) -> None:
    kit, model = _kit(kit_name), _chat(kit_name)
    requests, expected = kit_requests(kit, _features(kit, model))
    # Four neighbours (two with an image, two sampled) keep the kit's cases in mixed batches at a CI cost
    # the default kit's engine parity (ten neighbours, preemption variant) does not need to repeat.
    others = other_traffic(kit, model.llm.config.hidden_size, int(kit.manifest["model"]["num_image_token"]), n=4)
    mixed = [x for pair in zip(requests, others + [None] * len(requests), strict=False) for x in pair if x]
    longest = max(len(r.prompt_token_ids) + r.sampling.max_new_tokens for r in mixed)
    config = EngineConfig(block_size=16, num_kv_blocks=2048, max_num_seqs=32, max_num_batched_tokens=512,
                          max_model_len=-(-longest // 16) * 16)
    # A model of its own: the engine rewrites a CPU model's linear layers in place (cpu_weights.py).
    llm = load_language_model(kit.root, device="cpu", dtype=torch.float32)
    engine = LLMEngine(llm, config, tokenizer=load_tokenizer(kit.root))
    out = engine.run_until_done(mixed)
    for rid, exp in expected.items():
        assert [t for o in out[rid] for t in o.token_ids] == exp["ids"], rid
        # the streamed text is upstream's response before its final strip()
        assert "".join(o.text for o in out[rid]).strip() == exp["response"], rid
    assert engine.stats.cached_prompt_tokens > 0  # kit prompts share the system prompt's blocks
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
