"""The parity kits the repository carries (tests/fixtures/parity/<name>), for tests that run over all of
them at once: the dev kit (InternVL2-8B architecture) and one kit per other member of the family."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Kit

FIXTURE_KITS_DIR = Path(__file__).parent / "fixtures" / "parity"

# Every member's language model / tokenizer / template is covered by one of these (see the kits' README).
FAMILY_KIT_NAMES = ("dev", "internvl2-1b", "internvl2-4b", "internvl2-26b", "internvl2-76b")


def fixture_kit_names() -> list[str]:
    """Names of the kits under tests/fixtures/parity (directories with a manifest.json)."""
    return sorted(p.name for p in FIXTURE_KITS_DIR.iterdir() if (p / "manifest.json").is_file())


def fixture_kit(name: str) -> Kit:
    return Kit(FIXTURE_KITS_DIR / name)
