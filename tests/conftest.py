"""Shared fixtures. Parity tests read the kit named by PARITY_KIT (default: the dev kit copy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

DEFAULT_KIT = Path(__file__).parent / "fixtures" / "parity" / "dev"


class Kit:
    """A parity kit directory: a tiny checkpoint plus upstream goldens described by manifest.json."""

    def __init__(self, root: Path):
        self.root = root
        with (root / "manifest.json").open(encoding="utf-8") as f:
            self.manifest = json.load(f)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def npy(self, rel: str) -> np.ndarray:
        return np.load(self.root / rel)

    def text(self, rel: str) -> str:
        return (self.root / rel).read_text(encoding="utf-8")

    @property
    def images(self) -> dict[str, dict]:
        return {img["id"]: img for img in self.manifest["images"]}

    @property
    def chat_cases(self) -> dict[str, dict]:
        return {case["id"]: case for case in self.manifest["chat_cases"]}

    @property
    def tolerances(self) -> dict:
        return self.manifest["tolerances"]


def kit_root() -> Path:
    root = Path(os.environ.get("PARITY_KIT", DEFAULT_KIT)).expanduser().resolve()
    if not (root / "manifest.json").is_file():
        raise RuntimeError(f"PARITY_KIT={root} is not a parity kit (no manifest.json)")
    return root


def load_kit() -> Kit:
    return Kit(kit_root())


@pytest.fixture(scope="session")
def kit() -> Kit:
    return load_kit()
