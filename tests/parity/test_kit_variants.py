"""The suite holds for any kit with the manifest schema, not only for `dev`'s content.

`tests/kit_variants.py` derives kits from the dev kit that its upstream goldens still hold for:
renamed image ids and files, more images than one request may carry, sharded weights, float16
pixel-value files, images and cases in another order. Here the variant is checked to be a valid kit
that really differs from `dev` in those ways, the kit-reading code (the `Kit` pickers, the sharded
checkpoint reader) is run on it, and a sample of the parity tests runs on it as `PARITY_KIT`, from
collection on, in a pytest subprocess.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gateway.config import GatewayConfig
from services.common.checkpoint import INDEX_FILE, LLM_PREFIXES, SINGLE_FILE, VISION_PREFIXES, load_tensors
from services.common.fingerprint import model_fingerprint
from services.vision_encoder.config import EncoderConfig
from tests.conftest import DEFAULT_KIT, Kit
from tests.kit_variants import build_variant, renamed_id

# A sample of the parity suite: collection over the variant's ids, float16 pixel files, renamed
# tiles, features and video, reordered cases, sharded weights (both halves), the full chat path.
SAMPLE = [
    "tests/parity/test_preprocess.py",
    "tests/parity/test_prompts.py",
    "tests/parity/test_vision.py",
    "tests/parity/test_language_model.py::test_text_case[text_second_round]",
    "tests/parity/test_language_model.py::test_image_case[batch_chat_two_images-stored_features]",
    "tests/parity/test_language_model.py::test_image_case[multi_image_separate_round1-vision_encoder]",
    "tests/parity/test_chat.py::test_chat_case_matches_upstream[multi_image_combined]",
    "tests/parity/test_chat.py::test_chat_case_matches_upstream[video_round1]",
    "tests/unit/test_real_size.py::test_shape_formula_matches_the_kit",
]
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dev() -> Kit:
    return Kit(DEFAULT_KIT)


@pytest.fixture(scope="module")
def variant(tmp_path_factory) -> Kit:
    return Kit(build_variant(DEFAULT_KIT, tmp_path_factory.mktemp("kits") / "variant"))


def test_variant_differs_from_dev_where_the_schema_allows(dev: Kit, variant: Kit) -> None:
    assert not set(dev.images) & set(variant.images), "image ids were not renamed"
    assert not {img["file"] for img in dev.manifest["images"]} & {img["file"] for img in variant.manifest["images"]}
    per_request = max(GatewayConfig.max_images_per_request, EncoderConfig.max_images_per_request)
    assert len(variant.images) > per_request >= len(dev.images)
    assert variant.video["file"] != dev.video["file"]

    weights = variant.manifest["model"]["weights"]
    assert isinstance(weights, list) and INDEX_FILE in weights and len(variant.weight_files()) > 1
    assert not variant.path(SINGLE_FILE).exists()
    assert [f.name for f in dev.weight_files()] == [SINGLE_FILE]

    float16 = [img for img in variant.manifest["images"] if img.get("pixel_values_dtype") == "float16"]
    assert any(img["num_tiles"] > 1 for img in float16) and any(img["num_tiles"] == 1 for img in float16)
    for img in float16:
        assert variant.npy(img["pixel_values_file"]).dtype == np.float16

    assert sorted(dev.chat_cases) == sorted(variant.chat_cases)
    assert list(dev.chat_cases) != list(variant.chat_cases), "cases were not reordered"
    renamed = [renamed_id(i) for i in dev.images]
    assert [i for i in variant.images if i in renamed] != renamed, "images were not reordered"


def test_variant_manifest_is_consistent(variant: Kit) -> None:
    on_disk = {p.relative_to(variant.root).as_posix() for p in variant.root.rglob("*") if p.is_file()}
    assert set(variant.manifest["files"]) == on_disk - {"manifest.json"}
    for rel, entry in variant.manifest["files"].items():
        data = variant.path(rel).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"]), rel
    for img in variant.manifest["images"]:
        assert hashlib.sha256(variant.image_bytes(img)).hexdigest() == img["sha256"], img["id"]
        assert len(img["tiles"]) == img["num_tiles"] and all(t in on_disk for t in img["tiles"])
    ids = set(variant.images) | {"video"}
    for case in variant.manifest["chat_cases"]:
        assert set(case["inputs"]["images"]) <= ids, case["id"]
    assert {f["image"] for f in variant.manifest["vision_features"]} <= set(variant.images)


def test_kit_pickers_choose_by_property(dev: Kit, variant: Kit) -> None:
    for pick in (Kit.largest_image, Kit.smallest_image, Kit.multi_tile_image):
        ours, theirs = pick(variant), pick(dev)
        assert ours["num_tiles"] == theirs["num_tiles"] and ours["size"] == theirs["size"], pick.__name__
    for old in dev.images:
        exact = variant.pixel_values(renamed_id(old))
        assert exact.dtype == np.float32
        np.testing.assert_array_equal(exact, dev.pixel_values(old))
        new = variant.image(renamed_id(old))
        if new.get("pixel_values_file"):  # stored in float16: within the kit's tolerance, not exact
            stored = variant.npy(new["pixel_values_file"]).astype(np.float32)
            atol = variant.tolerances["pixel_values"]["atol_float16_files"]
            np.testing.assert_allclose(stored, exact, atol=atol, rtol=0)
    assert variant.pixel_values("video").shape == dev.pixel_values("video").shape
    assert variant.text_token_range() == dev.text_token_range()


def test_lookups_of_what_a_kit_lacks_fail_naming_it(variant: Kit) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"has no image 'img0'.*which this test needs"):
        variant.image("img0")
    with pytest.raises(pytest.fail.Exception, match="has no chat case 'no_such_case'"):
        variant.case("no_such_case")
    with pytest.raises(pytest.fail.Exception, match="has no image with 99 tiles"):
        variant.image_where("with 99 tiles", lambda img: img["num_tiles"] == 99)


def test_sharded_weights_read_as_the_single_file(dev: Kit, variant: Kit) -> None:
    for prefixes in (VISION_PREFIXES, LLM_PREFIXES):
        ours = load_tensors(variant.root, prefixes, dtype=torch.bfloat16, progress=False)
        theirs = load_tensors(dev.root, prefixes, dtype=torch.bfloat16, progress=False)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert model_fingerprint(variant.root, "fp32") != model_fingerprint(dev.root, "fp32")  # other files


def test_a_sample_of_the_suite_passes_on_the_variant(variant: Kit) -> None:
    env = {**os.environ, "PARITY_KIT": str(variant.root)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SAMPLE],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"{summary}\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
