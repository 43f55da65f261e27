"""Language-model parity (the architecture the kit names) against the kit's upstream goldens (fp32, CPU).

Prompts come straight from the kit's `input_ids.npy` / `attention_mask.npy`, so these tests check
the decoder and the generation loop alone, not the tokenizer or the prompt template.

- text cases: no image input at all;
- image cases, `stored_features`: image embeddings are the kit's own `extract_feature` outputs
  (`vision_features[]`), so only the decoder is under test; available for the images the kit ships
  features for;
- image cases, `vision_encoder`: embeddings come from `services.vision_encoder.model` applied to
  `pixel_values` built from the kit's tile PNGs with the manifest's formula (every image case,
  video included).

Every comparison reads its tolerance from the kit's manifest; nothing here is specific to `dev`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.language_decoder.generate import generate
from services.language_decoder.models import CausalLM, load_language_model
from services.language_decoder.models.layers import position_ids_from_mask
from tests.conftest import Kit, load_kit

_KIT = load_kit()
_TEXT_CASES = [c["id"] for c in _KIT.manifest["chat_cases"] if not c["inputs"]["images"]]
_STORED = {v["image"]: v["file"] for v in _KIT.manifest.get("vision_features", [])}
_IMAGE_PARAMS = [
    pytest.param(c["id"], source, id=f"{c['id']}-{source}")
    for c in _KIT.manifest["chat_cases"]
    if c["inputs"]["images"]
    for source in ("stored_features", "vision_encoder")
    if source == "vision_encoder" or all(img in _STORED for img in c["inputs"]["images"])
]


@pytest.fixture(scope="module")
def lm(kit: Kit) -> CausalLM:
    return load_language_model(kit.root, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def vision_features(kit: Kit):
    """Per-image extract_feature outputs from our vision encoder, computed once per image id."""
    from services.vision_encoder.model import load_vision_encoder

    encoder = load_vision_encoder(kit.root, device="cpu", dtype=torch.float32)
    cache: dict[str, torch.Tensor] = {}

    def features(image_id: str) -> torch.Tensor:
        if image_id not in cache:
            pixel_values = torch.from_numpy(kit.pixel_values(image_id))  # exact: from the tile PNGs
            with torch.inference_mode():
                cache[image_id] = encoder.extract_feature(pixel_values).float()
        return cache[image_id]

    return features


def _close(actual: np.ndarray, expected: np.ndarray, tol: dict, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = float(np.abs(actual - expected).max())
    np.testing.assert_allclose(
        actual, expected, atol=tol["atol"], rtol=tol["rtol"], err_msg=f"{what}: max |diff| {diff:.3g}"
    )


def _check_case(kit: Kit, lm: CausalLM, case_id: str, image_embeds: torch.Tensor | None) -> None:
    case = kit.chat_cases[case_id]
    exp, tol = case["expected"], kit.tolerances
    kwargs = case["inputs"]["effective_generate_kwargs"]
    input_ids = torch.from_numpy(kit.npy(exp["input_ids_file"])).long()
    mask = torch.from_numpy(kit.npy(exp["attention_mask_file"])).long()
    assert list(input_ids.shape) == exp["input_ids_shape"]
    ctx_id = kit.manifest["special_token_ids"]["<IMG_CONTEXT>"]

    with torch.inference_mode():
        embeds = lm.embed(input_ids, image_embeds, ctx_id)
        logits = lm(embeds, position_ids_from_mask(mask), attention_mask=mask)  # [B, T, V], no cache
    _close(logits[:, -1].numpy(), kit.npy(exp["last_logits_file"]), tol["last_logits_fp32"], "last logits")
    if "prefill_logits_all_positions_file" in exp:
        expected_all = kit.npy(exp["prefill_logits_all_positions_file"])
        actual_all = logits[0].numpy() if expected_all.ndim == 2 else logits.numpy()
        _close(actual_all, expected_all, tol["last_logits_fp32"], "prefill logits (all positions)")

    out = generate(
        lm, embeds, mask,
        max_new_tokens=kwargs["max_new_tokens"], eos_token_id=kwargs["eos_token_id"],
        pad_token_id=kwargs["pad_token_id"], do_sample=kwargs.get("do_sample", False),
        repetition_penalty=kwargs.get("repetition_penalty", 1.0), return_step_logits=True,
    )
    assert out.token_ids == kit.generated_ids(case), "greedy ids differ from upstream generate()"

    # Step logits are comparable per row only up to (and including) the step that emitted EOS;
    # later steps of a finished batch row run on pad inputs.
    step_expected = kit.npy(exp["step_logits_file"])
    assert out.step_logits is not None and out.step_logits.shape == step_expected.shape
    eos = kwargs["eos_token_id"]
    for b, ids in enumerate(kit.generated_ids(case)):
        n = ids.index(eos) + 1 if eos in ids else len(ids)
        actual = out.step_logits[:n, b].numpy()
        _close(actual, step_expected[:n, b], tol["step_logits_fp32"], f"step logits row {b}")


def test_kit_has_text_and_image_cases() -> None:
    assert _TEXT_CASES, "the kit has no text-only chat case"
    assert _IMAGE_PARAMS, "the kit has no image chat case"


@pytest.mark.parametrize("case_id", _TEXT_CASES)
def test_text_case(kit: Kit, lm: CausalLM, case_id: str) -> None:
    _check_case(kit, lm, case_id, None)


@pytest.mark.parametrize(("case_id", "source"), _IMAGE_PARAMS)
def test_image_case(
    request: pytest.FixtureRequest, kit: Kit, lm: CausalLM, case_id: str, source: str
) -> None:
    images = kit.chat_cases[case_id]["inputs"]["images"]
    if source == "stored_features":
        parts = [torch.from_numpy(kit.npy(_STORED[img])) for img in images]
    else:  # the encoder is only loaded here, so stored-feature cases never depend on it
        features = request.getfixturevalue("vision_features")
        parts = [features(img) for img in images]
    _check_case(kit, lm, case_id, torch.cat(parts).reshape(-1, parts[0].shape[-1]))
