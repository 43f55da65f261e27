"""model_fingerprint: stable for one checkpoint + dtype, different when either changes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.common.fingerprint import FingerprintError, model_fingerprint

REPO = Path(__file__).resolve().parents[2]


def make_checkpoint(root: Path, *, hidden: int = 8, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"llm_config": {"hidden_size": hidden}}))
    gen = torch.Generator().manual_seed(seed)
    save_file({"mlp1.1.weight": torch.randn(hidden, hidden, generator=gen)}, str(root / "model.safetensors"))
    return root


def fingerprint_in_a_fresh_interpreter(model_dir: Path, dtype: str) -> str:
    """The id as another process computes it: nothing (hash seeds, caches) shared with this one."""
    code = "import sys; from services.common.fingerprint import model_fingerprint as f; print(f(*sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, str(model_dir), dtype], cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=60)
    return done.stdout.strip()


def test_the_same_checkpoint_written_twice_gives_the_same_short_hex_id(tmp_path: Path) -> None:
    # Two directories written independently with the same contents; one id computed in another process.
    first = model_fingerprint(make_checkpoint(tmp_path / "a"), "bf16")
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert fingerprint_in_a_fresh_interpreter(make_checkpoint(tmp_path / "b"), "bf16") == first


def test_copy_elsewhere_gives_the_same_id(tmp_path: Path) -> None:
    root = make_checkpoint(tmp_path / "a")
    copy = tmp_path / "b"
    shutil.copytree(root, copy)
    assert model_fingerprint(root, "bf16") == model_fingerprint(copy, "bf16")


def test_dtype_changes_the_id(tmp_path: Path) -> None:
    root = make_checkpoint(tmp_path / "a")
    assert model_fingerprint(root, "bf16") != model_fingerprint(root, "fp32")


def test_config_changes_the_id(tmp_path: Path) -> None:
    root = make_checkpoint(tmp_path / "a")
    before = model_fingerprint(root, "bf16")
    (root / "config.json").write_text(json.dumps({"llm_config": {"hidden_size": 8}, "use_thumbnail": False}))
    assert model_fingerprint(root, "bf16") != before


def test_same_shapes_different_weights_change_the_id(tmp_path: Path) -> None:
    # Two fine-tunes of one architecture: identical config, headers and sizes.
    a = make_checkpoint(tmp_path / "a", seed=0)
    b = make_checkpoint(tmp_path / "b", seed=1)
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    assert model_fingerprint(a, "bf16") != model_fingerprint(b, "bf16")


def test_added_shard_changes_the_id(tmp_path: Path) -> None:
    root = make_checkpoint(tmp_path / "a")
    before = model_fingerprint(root, "bf16")
    save_file({"x": torch.zeros(2)}, str(root / "extra.safetensors"))
    assert model_fingerprint(root, "bf16") != before


def test_kit_checkpoint_is_fingerprinted_by_its_config_and_weights_only(kit, tmp_path: Path) -> None:
    fp32 = model_fingerprint(kit.root, "fp32")
    assert re.fullmatch(r"[0-9a-f]{16}", fp32) and model_fingerprint(kit.root, "bf16") != fp32
    # A copy of just config.json and the safetensors (no tokenizer, no goldens), fingerprinted elsewhere.
    copy = tmp_path / "kit"
    copy.mkdir()
    for path in [kit.root / "config.json", *kit.root.glob("*.safetensors")]:
        shutil.copy2(path, copy / path.name)
    assert fingerprint_in_a_fresh_interpreter(copy, "fp32") == fp32


def test_not_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FingerprintError, match="config.json"):
        model_fingerprint(tmp_path, "bf16")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FingerprintError, match="safetensors"):
        model_fingerprint(tmp_path, "bf16")
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(FingerprintError, match="header length"):
        model_fingerprint(tmp_path, "bf16")


def test_int8_weights_change_the_id_and_none_keeps_the_old_one(tmp_path: Path) -> None:
    root = make_checkpoint(tmp_path / "a")
    plain = model_fingerprint(root, "bf16")
    assert model_fingerprint(root, "bf16", "none") == plain  # ids of unquantised models did not move
    assert model_fingerprint(root, "bf16", "int8") not in (plain, model_fingerprint(root, "fp32", "int8"))
