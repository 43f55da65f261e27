"""Edge cases of InternVL dynamic tiling, pixel normalization, image decoding and frame sampling."""

from __future__ import annotations

import io
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from services.vision_encoder.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TilingConfig,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    get_index,
    load_image,
    load_video,
    open_image,
    read_video_frames,
    target_ratios,
    tiles_to_pixel_values,
)

S = 448


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def grid_of(tiles: list[Image.Image], has_thumb: bool) -> int:
    return len(tiles) - int(has_thumb)


# ---------------------------------------------------------------- target ratios / tie-break


def test_target_ratios_content_and_area_order():
    for lo, hi in [(1, 1), (1, 6), (1, 12), (3, 8), (1, 40)]:
        ratios = target_ratios(lo, hi)
        expected = {(i, j) for i in range(1, hi + 1) for j in range(1, hi + 1) if lo <= i * j <= hi}
        assert set(ratios) == expected and len(ratios) == len(expected)
        areas = [i * j for i, j in ratios]
        assert areas == sorted(areas)


def test_target_ratios_equal_area_order_matches_upstream_set_order():
    # Upstream sorts a Python set by area only (stable), so equal-area grids keep CPython's set order.
    # Recorded from the upstream expression on CPython 3.11 for the InternVL2 default (1, 12).
    assert target_ratios(1, 12) == [
        (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
        (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5),
        (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6),
    ]  # fmt: skip


def test_tie_break_later_grid_wins_only_when_area_exceeds_half():
    ratios = [(1, 1), (2, 1)]  # aspect 1.5 is equally far (0.5) from both
    # threshold for (2, 1) is 0.5 * 448^2 * 2 = 200704 px
    assert find_closest_aspect_ratio(1.5, ratios, 600, 334, S) == (1, 1)  # 200400 px
    assert find_closest_aspect_ratio(1.5, ratios, 600, 335, S) == (2, 1)  # 201000 px
    assert find_closest_aspect_ratio(1.5, ratios, 100, 100, S) == (1, 1)
    assert find_closest_aspect_ratio(1.5, ratios, 448, 448, S) == (1, 1)  # exactly equal: not greater
    assert find_closest_aspect_ratio(1.5, ratios, 449, 448, S) == (2, 1)
    # a strictly closer ratio always wins, whatever the area
    assert find_closest_aspect_ratio(1.9, ratios, 1, 1, S) == (2, 1)
    assert find_closest_aspect_ratio(1.1, ratios, 10**6, 10**6, S) == (1, 1)


@pytest.mark.parametrize(("side", "cols_rows"), [(633, (1, 1)), (634, (2, 2)), (896, (2, 2)), (951, (3, 3))])
def test_square_tie_break_in_dynamic_preprocess(side, cols_rows):
    # (1,1), (2,2), (3,3) all match a square exactly; (2,2) needs area > 0.5*448^2*4 = 401408
    # (633^2 = 400689, 634^2 = 401956), (3,3) needs area > 903168 (950^2 = 902500, 951^2 = 904401).
    tiles = dynamic_preprocess(noise(side, side))
    blocks = cols_rows[0] * cols_rows[1]
    assert len(tiles) == (blocks + 1 if blocks > 1 else 1)


# ---------------------------------------------------------------- dynamic_preprocess


def test_one_pixel_image():
    img = Image.new("RGB", (1, 1), (12, 34, 56))
    tiles = dynamic_preprocess(img)
    assert len(tiles) == 1 and tiles[0].size == (S, S)
    assert (np.asarray(tiles[0]) == np.array([12, 34, 56], np.uint8)).all()
    assert load_image(img).shape == (1, 3, S, S)


@pytest.mark.parametrize(("size", "grid"), [((10, 1000), (1, 12)), ((1000, 10), (12, 1))])
def test_extreme_aspect_ratios(size, grid):
    img = noise(*size)
    tiles = dynamic_preprocess(img)
    assert len(tiles) == grid[0] * grid[1] + 1
    assert all(t.size == (S, S) for t in tiles)
    # tiles are crops of the image resized to the grid, row-major
    resized = np.asarray(img.resize((S * grid[0], S * grid[1])))
    for k, tile in enumerate(tiles[:-1]):
        r, c = divmod(k, grid[0])
        assert np.array_equal(np.asarray(tile), resized[r * S : (r + 1) * S, c * S : (c + 1) * S])
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((S, S))))


def test_exact_448_square_is_one_tile_no_thumbnail_and_unchanged():
    img = noise(S, S)
    tiles = dynamic_preprocess(img)
    assert len(tiles) == 1
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(img))


def test_exact_896_square_is_four_tiles_plus_thumbnail():
    img = noise(2 * S, 2 * S)
    tiles = dynamic_preprocess(img)
    assert len(tiles) == 5
    src = np.asarray(img)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # no resize needed: crops are exact
        assert np.array_equal(np.asarray(tiles[k]), src[r * S : (r + 1) * S, c * S : (c + 1) * S])
    assert np.array_equal(np.asarray(tiles[4]), np.asarray(img.resize((S, S), Image.Resampling.BICUBIC)))


def test_use_thumbnail_false():
    assert len(dynamic_preprocess(noise(2 * S, 2 * S), use_thumbnail=False)) == 4


@pytest.mark.parametrize("size", [(1, 1), (800, 600), (10, 1000), (3000, 20), (S, S)])
def test_max_num_one_is_always_a_single_resized_tile(size):
    img = noise(*size)
    tiles = dynamic_preprocess(img, max_num=1)
    assert len(tiles) == 1
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(img.resize((S, S))))


def test_max_num_forty():
    assert len(dynamic_preprocess(noise(4000, 10), max_num=40)) == 41  # (40, 1) + thumbnail
    assert len(dynamic_preprocess(noise(5 * S, 8 * S), max_num=40)) == 41  # (5, 8) exact: 40 + thumb
    assert len(dynamic_preprocess(noise(6 * S, 6 * S), max_num=40)) == 37  # (6, 6): 36 + thumb


def test_min_num_forces_more_tiles():
    tiles = dynamic_preprocess(noise(S, S), min_num=2, max_num=4)
    # square image: (2,2) is the only exact match among grids with 2..4 tiles
    assert len(tiles) == 5


def test_other_image_size():
    tiles = dynamic_preprocess(noise(64, 32), image_size=32)
    assert len(tiles) == 3 and all(t.size == (32, 32) for t in tiles)  # (2, 1) + thumbnail


def test_tiling_config_matches_dynamic_preprocess_keywords():
    cfg = TilingConfig(max_num=6)
    assert len(dynamic_preprocess(noise(2000, 500), **asdict(cfg))) == 5  # (4, 1) + thumb
    with pytest.raises(AttributeError):
        cfg.max_num = 3  # type: ignore[misc]


# ---------------------------------------------------------------- pixel values


def test_pixel_values_formula_is_exact():
    tiles = [noise(S, S, seed=1), noise(S, S, seed=2)]
    pv = tiles_to_pixel_values(tiles)
    assert pv.dtype == torch.float32 and pv.shape == (2, 3, S, S)
    u8 = np.stack([np.asarray(t) for t in tiles]).transpose(0, 3, 1, 2).astype(np.float32)
    mean = np.array(IMAGENET_MEAN, np.float32)[None, :, None, None]
    std = np.array(IMAGENET_STD, np.float32)[None, :, None, None]
    expected = (u8 / np.float32(255) - mean) / std
    assert expected.dtype == np.float32
    assert np.array_equal(pv.numpy(), expected)


def test_pixel_value_extremes():
    pv = tiles_to_pixel_values([Image.new("RGB", (2, 2), (0, 0, 0)), Image.new("RGB", (2, 2), (255,) * 3)])
    for c in range(3):
        assert pv[0, c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], rel=1e-6)
        assert pv[1, c, 0, 0].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-6)


def test_load_image_equals_tiles_to_pixel_values():
    img = noise(700, 300)
    assert torch.equal(load_image(img), tiles_to_pixel_values(dynamic_preprocess(img)))
    assert load_image(img, max_num=1).shape[0] == 1


# ---------------------------------------------------------------- decoding / modes


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
def test_any_pil_mode_becomes_rgb_like_convert(mode):
    img = noise(9, 7).convert(mode)
    out = open_image(img)
    assert out.mode == "RGB" and out.size == (9, 7)
    assert np.array_equal(np.asarray(out), np.asarray(img.convert("RGB")))
    assert torch.equal(load_image(img), load_image(out))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_encoded_png_modes_become_rgb(mode, tmp_path):
    src = Image.new("I;16", (5, 4), 300) if mode == "I;16" else noise(5, 4).convert(mode)
    data = _png(src)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == src.mode
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for inp in (data, str(path), path):
        out = open_image(inp)
        assert out.mode == "RGB"
        assert np.array_equal(np.asarray(out), np.asarray(decoded.convert("RGB")))


def test_rgba_drops_alpha_without_compositing():
    img = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    assert np.asarray(open_image(_png(img)))[0, 0].tolist() == [10, 20, 30]


def test_cmyk_jpeg_bytes():
    buf = io.BytesIO()
    noise(16, 16).convert("CMYK").save(buf, format="JPEG")
    assert open_image(buf.getvalue()).mode == "RGB"


@pytest.mark.parametrize("data", [b"", b"not an image", _png(noise(8, 8))[:60]])
def test_undecodable_image_raises_value_error(data):
    with pytest.raises(ValueError):
        open_image(data)


def test_missing_image_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "missing.png")


# ---------------------------------------------------------------- get_index / video


def test_get_index_without_bound_rounds_half_to_even():
    # seg_size 2.5: np.round(2.5) == 2 and np.round(7.5) == 8 (banker's rounding), then +1.25 truncated
    assert get_index(None, 30.0, 10, num_segments=4).tolist() == [1, 3, 6, 9]
    assert get_index(None, 30.0, 100, num_segments=4).tolist() == [12, 37, 62, 87]
    idx = get_index(None, 25.0, 299, num_segments=32)
    assert len(idx) == 32 and idx.min() >= 0 and idx.max() <= 299 and (np.diff(idx) > 0).all()
    assert get_index(None, 24.0, 0, num_segments=3).tolist() == [0, 0, 0]  # one-frame video


def test_get_index_with_bound():
    assert get_index((1.0, 2.0), 10.0, 100, num_segments=5).tolist() == [11, 13, 15, 17, 19]
    # start*fps = 2.5 rounds (half to even) to 2; end clips to max_frame
    assert get_index((0.25, 100.0), 10.0, 42, num_segments=4).tolist() == [7, 17, 27, 37]
    # first_idx wins over an earlier start; a bound starting before 0 is the same as no bound
    assert get_index((0.0, 2.0), 10.0, 100, first_idx=4, num_segments=2).tolist() == [8, 16]
    assert (
        get_index((-5.0, 1e6), 24.0, 60, num_segments=8).tolist()
        == get_index(None, 24.0, 60, num_segments=8).tolist()
    )


def test_get_index_returns_int_array():
    idx = get_index(None, 24.0, 60, num_segments=8)
    assert isinstance(idx, np.ndarray) and idx.dtype.kind == "i"


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, b"garbage" * 50])
def test_undecodable_video_raises_value_error(data):
    with pytest.raises(ValueError):
        load_video(data, num_segments=2)
    with pytest.raises(ValueError):
        read_video_frames(data, num_segments=2)


def test_undecodable_video_file_raises_value_error(tmp_path):
    path = tmp_path / "bad.mp4"
    path.write_bytes(b"garbage" * 50)
    with pytest.raises(ValueError):
        load_video(path)
    with pytest.raises(FileNotFoundError):
        load_video(tmp_path / "missing.mp4")
