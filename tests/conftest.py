"""Shared fixtures. Parity tests read the kit named by PARITY_KIT (default: the dev kit copy).

Real redis-server processes (tests/redis_server.py) for the integration tests and for the unit tests
of the Redis-backed stores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

import numpy as np
import pytest
from PIL import Image

from tests.redis_server import RedisServer, RedisServerMissing

DEFAULT_KIT = Path(__file__).parent / "fixtures" / "parity" / "dev"
T = TypeVar("T")


class Kit:
    """A parity kit directory: a tiny checkpoint plus upstream goldens described by manifest.json.

    Tests read everything kit-specific through this class (ids, files, questions, sizes, dtypes,
    tolerances) and pick inputs by their properties, never by a kit's names. What a test needs and
    the kit lacks is a test failure naming it (`lacks`), never a skip; the pickers are called inside
    tests and fixtures, so one test's need never stops the collection of the others.
    """

    def __init__(self, root: Path):
        self.root = root
        with (root / "manifest.json").open(encoding="utf-8") as f:
            self.manifest = json.load(f)

    @property
    def name(self) -> str:
        return str(self.manifest.get("kit", self.root.name))

    def lacks(self, what: str) -> NoReturn:
        pytest.fail(f"parity kit {self.name!r} ({self.root}) has no {what}, which this test needs", pytrace=False)

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

    # ------------------------------------------------------------------ lookups that fail clearly

    def image(self, image_id: str) -> dict:
        if image_id not in self.images:
            self.lacks(f"image {image_id!r} (its images are {sorted(self.images)})")
        return self.images[image_id]

    def case(self, case_id: str) -> dict:
        if case_id not in self.chat_cases:
            self.lacks(f"chat case {case_id!r} (its cases are {sorted(self.chat_cases)})")
        return self.chat_cases[case_id]

    @property
    def video(self) -> dict:
        if not self.manifest.get("video"):
            self.lacks("video")
        return self.manifest["video"]

    def image_file(self, image: dict | str) -> Path:
        return self.path((self.image(image) if isinstance(image, str) else image)["file"])

    def image_bytes(self, image: dict | str) -> bytes:
        return self.image_file(image).read_bytes()

    # ------------------------------------------------------------------ inputs picked by property

    def image_where(self, what: str, accept: Callable[[dict], bool]) -> dict:
        """The first image (in manifest order) that `accept`s; `what` names the need if none does."""
        for image in self.manifest["images"]:
            if accept(image):
                return image
        self.lacks(f"image {what}")

    def largest_image(self) -> dict:
        """The image with the most tiles (the longest prompt)."""
        if not self.manifest["images"]:
            self.lacks("images")
        return max(self.manifest["images"], key=lambda img: img["num_tiles"])

    def smallest_image(self) -> dict:
        """The image with the fewest tiles (the cheapest to encode)."""
        if not self.manifest["images"]:
            self.lacks("images")
        return min(self.manifest["images"], key=lambda img: img["num_tiles"])

    def multi_tile_image(self) -> dict:
        """An image tiled into a grid plus a thumbnail (the one with the most tiles)."""
        grids = [img for img in self.manifest["images"] if img["num_tiles"] > 1 and img["has_thumbnail"]]
        if not grids:
            self.lacks("image with several tiles and a thumbnail")
        return max(grids, key=lambda img: img["num_tiles"])

    def media_tiles(self, media_id: str) -> list[str]:
        """Tile PNGs of an image id, or of the video for a case's `"video"` input."""
        return self.video["tiles"] if media_id == "video" else self.image(media_id)["tiles"]

    def pixel_values(self, media_id: str) -> np.ndarray:
        """float32 `pixel_values` [tiles, 3, H, W] from the lossless tile PNGs with the manifest's formula.

        Exact, unlike a `pixel_values_file`, which a kit may store in float16 (`pixel_values_dtype`).
        """
        pre = self.manifest["preprocess"]  # pixel_values_from_tiles: (float32(tile[y,x,c]) / 255 - mean[c]) / std[c]
        mean, std = np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32)
        tiles = np.stack([np.asarray(Image.open(self.path(t)).convert("RGB")) for t in self.media_tiles(media_id)])
        pixels = (tiles.astype(np.float32) / np.float32(255) - mean) / std
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))

    def weight_files(self) -> list[Path]:
        """The safetensors files of `model.weights`: one file name, or a list (shards and their index)."""
        listed = self.manifest["model"]["weights"]
        files = [self.path(f) for f in ([listed] if isinstance(listed, str) else listed) if f.endswith(".safetensors")]
        if not files:
            self.lacks(f"safetensors file in model.weights ({listed!r})")
        return files

    def generated_ids(self, case: dict | str) -> list[list[int]]:
        """The ids upstream's model generated for each row of a chat case, as `generate()` gave them minus
        any prompt echo: transformers 4.37 (the 4B kit) starts generation from `inputs_embeds` with a
        `[bos]` input_ids row and returns it in front of the new tokens. Echo = ids per row beyond the
        number of steps (`step_logits_shape[0]`); it must be the BOS token, or the kit is inconsistent."""
        exp = (self.case(case) if isinstance(case, str) else case)["expected"]
        steps = exp["step_logits_shape"][0]
        rows = exp["generated_ids"]
        echo = {len(row) - steps for row in rows}
        if len(echo) != 1 or min(echo) < 0:
            self.lacks(f"consistent generated_ids (row lengths {[len(r) for r in rows]} vs {steps} steps)")
        n = echo.pop()
        bos = self.manifest["special_token_ids"].get("<s>")
        if n and any(row[:n] != [bos] * n for row in rows):
            self.lacks(f"BOS ({bos}) as the {n} echoed id(s) in front of generated_ids")
        return [row[n:] for row in rows]

    def text_token_range(self) -> range:
        """Ids of ordinary text tokens: from 3 up to the first special token above the first three."""
        special = [i for i in self.manifest["special_token_ids"].values() if i > 2]
        return range(3, min(special, default=int(self.manifest["model"]["vocab_size"])))


def in_groups(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """`items` cut into consecutive groups of at most `size` (e.g. images under a per-request limit)."""
    return [items[k : k + size] for k in range(0, len(items), size)]


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


# ---------------------------------------------------------------------------------------- redis-server


def _new_redis_server(workdir: Path, **kwargs: str | None) -> RedisServer:
    try:
        return RedisServer(workdir, **kwargs)
    except RedisServerMissing as e:
        missing = str(e)
    # Fail, not skip: a skipped Redis suite looks green while nothing was tested.
    pytest.fail(missing, pytrace=False)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server per test (tests may stop, pause or restart it)."""
    server = _new_redis_server(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory for extra servers, e.g. `start_redis(maxmemory="2mb", maxmemory_policy="noeviction")`."""
    servers: list[RedisServer] = []

    def start(*, maxmemory: str | None = None, maxmemory_policy: str | None = None) -> RedisServer:
        workdir = tmp_path / f"redis-{len(servers)}"
        server = _new_redis_server(workdir, maxmemory=maxmemory, maxmemory_policy=maxmemory_policy)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
