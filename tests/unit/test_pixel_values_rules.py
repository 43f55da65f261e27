"""Rules of the image side of preprocessing that the parity goldens do not reach: non-RGB tiles, load_image's
arguments and defaults, the exact refusal messages, and the torch-free tile counting's edge cases."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.common.limits import Tiling
from services.common.tiling import (
    find_closest_aspect_ratio,
    known_tiles,
    max_tile_count,
    tile_grid,
    video_tiles_problem,
)
from services.vision_encoder.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_image_size,
    load_image,
    open_image,
    tiles_to_pixel_values,
)


def test_no_tiles_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="^no tiles to convert$"):
        tiles_to_pixel_values([])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_tiles_are_converted_like_upstream(mode):
    rgb = Image.fromarray(np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5, "RGB")
    tile = rgb.convert(mode)
    values = tiles_to_pixel_values([tile])
    expected = np.asarray(tile.convert("RGB"), dtype=np.float32) / 255
    expected = (expected - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    assert values.shape == (1, 3, 4, 4)
    np.testing.assert_allclose(values[0].permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-6)


def test_undecodable_image_says_so():
    with pytest.raises(ValueError, match="^cannot decode image: "):
        open_image(b"not an image at all")


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(out, format="PNG")
    return out.getvalue()


def test_load_image_default_max_is_twelve_tiles():
    # 13:1 fits a 13x1 grid exactly, which only a limit of 13 or more allows: 12x1 + thumbnail here.
    assert load_image(png(130, 10)).shape[0] == 13


def test_load_image_passes_each_tiling_argument():
    assert load_image(png(20, 20), min_num=2).shape[0] == 5  # a 2x2 grid + thumbnail; min 1 would give 1 tile
    assert load_image(png(20, 20), image_size=224).shape[1:] == (3, 224, 224)
    assert load_image(png(40, 20), max_num=2, use_thumbnail=False).shape[0] == 2


def test_check_image_size_messages_in_full():
    assert check_image_size(3000, 2000, 1_000_000, "images[1]") == (
        "images[1] is 3000x2000 = 6000000 pixels, over the limit of 1000000; downscale it")
    assert check_image_size(500, 2, 1_000_000, "images[0]") == (
        "images[0] is 500x2, more elongated than 200:1; crop or pad it to a less extreme aspect ratio")


def test_no_candidate_grids_fall_back_to_one_tile():
    assert find_closest_aspect_ratio(3.0, [], 900, 300, 448) == (1, 1)


@pytest.mark.parametrize(
    ("size", "tiles"), [((0, 5), 0), ((5, 0), 0), ((1, 5), 6), ((5, 1), 6), ((1, 1), 1), (None, 0)])
def test_known_tiles_at_the_size_boundary(size, tiles):  # 1x5: a 1x5 grid + thumbnail
    assert known_tiles(size, Tiling(12, 1, True), 448) == tiles


@pytest.mark.parametrize(
    ("tiling", "most"),
    [(Tiling(12, 1, True), 13), (Tiling(12, 1, False), 12), (Tiling(1, 1, True), 1), (Tiling(2, 1, True), 3)])
def test_max_tile_count(tiling, most):
    assert max_tile_count(tiling) == most


def test_video_tiles_problem_with_a_limit_of_one_tile():
    assert video_tiles_problem(1, 1, 1) is None
    assert "would be 2 tiles (2 segments" in video_tiles_problem(2, 2, 1)
    assert video_tiles_problem(10**6, 2, 0) is None  # 0: the limit is unknown


@pytest.mark.parametrize(
    ("width", "height", "min_num", "max_num", "grid"),
    [(5, 32, 16, 16, (1, 16)),  # 5/32 is exactly between 1x16 and 2x8
     (5, 4, 18, 19, (3, 6))],  # 5/4 is exactly between 3x6 and 6x3
)
def test_exact_ties_between_equal_area_grids_follow_upstreams_set_order(width, height, min_num, max_num, grid):
    # A small image keeps the first of two equally close grids; among equal areas "first" is the set's order.
    assert tile_grid(width, height, min_num, max_num, 448) == grid
