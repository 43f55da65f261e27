"""services.tools.fetch_model: the fill Job's completeness check and arguments (no network here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.common.checkpoint import CheckpointError
from services.tools.fetch_model import check_checkpoint, parse_args
from tests.conftest import load_kit

KIT = load_kit()


def copy_checkpoint(dest: Path, leave_out: str = "") -> Path:
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "model.safetensors"):
        if name != leave_out:
            shutil.copy(KIT.root / name, dest / name)
    return dest


def test_a_complete_checkpoint_passes(tmp_path: Path):
    assert check_checkpoint(copy_checkpoint(tmp_path)) == 1


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.model", "model.safetensors"])
def test_a_missing_file_is_named(tmp_path: Path, missing: str):
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.") + "|safetensors"):
        check_checkpoint(copy_checkpoint(tmp_path, leave_out=missing))


def test_a_missing_shard_of_an_index_is_named(tmp_path: Path):
    copy_checkpoint(tmp_path, leave_out="model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors missing"):
        check_checkpoint(tmp_path)


def test_arguments():
    args = parse_args(["OpenGVLab/InternVL2-8B", "/models/InternVL2-8B", "--revision", "abc"])
    assert (args.repo_id, str(args.directory), args.revision) == ("OpenGVLab/InternVL2-8B", "/models/InternVL2-8B",
                                                                  "abc")
