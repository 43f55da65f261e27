"""docs/models.md's needs table is what `services.tools.member_sizes` prints for the real configs
(one test per member, so a changed rule or config shows which rows to regenerate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.model_config import InternVLConfig
from services.common.quantization import INT8, NO_QUANTIZATION
from services.tools.member_sizes import main, member_needs, table

ROOT = Path(__file__).resolve().parents[2]
REAL_CONFIGS = ROOT / "tests" / "fixtures" / "real_configs"
DOC = ROOT / "docs" / "models.md"


@pytest.mark.parametrize("config", sorted(REAL_CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_the_documented_row_is_the_computed_one(config):
    raw = json.loads(config.read_text(encoding="utf-8"))
    header, rule, row = table([member_needs(raw["_name"], InternVLConfig.from_dict(raw))]).splitlines()
    lines = DOC.read_text(encoding="utf-8").splitlines()
    assert header in lines, "docs/models.md lacks the needs table's header (or its columns changed)"
    start = lines.index(header)
    end = lines.index("", start)
    assert lines[start + 1] == rule
    documented = [line for line in lines[start + 2:end] if line.startswith(f"| {raw['_name']} | ")]
    assert documented == [row], f"regenerate docs/models.md: python -m services.tools.member_sizes {config}"


def test_the_tool_prints_the_table(capsys):
    assert main([str(REAL_CONFIGS / "internvl2-8b.json"), str(REAL_CONFIGS / "internvl2-2b.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| InternVL2-2B", "| InternVL2-8B"]  # by size


@pytest.mark.parametrize("config", sorted(REAL_CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_the_readme_row_has_the_computed_weights(config):
    raw = json.loads(config.read_text(encoding="utf-8"))
    member = member_needs(raw["_name"], InternVLConfig.from_dict(raw))
    rows = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
            if line.startswith(f"| {raw['_name']} | ")]
    assert len(rows) == 1, f"README.md's models table has {len(rows)} rows for {raw['_name']}"
    cells = rows[0].split(" | ")
    bf16 = (member.vision_bytes() + member.language_bytes(NO_QUANTIZATION)) / 1e9
    assert cells[2:4] == [f"{bf16:.1f} GB", f"{member.language_bytes(INT8) / 1e9:.1f} GB"]
