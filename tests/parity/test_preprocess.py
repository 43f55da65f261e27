"""Preprocessing parity against the kit named by PARITY_KIT: tiles, pixel values and video frames.

Every expected number (sizes, grids, tile counts, frame indices, stats, tolerances) comes from the
kit's manifest, so any kit with the same schema is checked the same way.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from services.vision_encoder.preprocess import (
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
from tests.conftest import load_kit

_KIT = load_kit()  # collection time: a broken PARITY_KIT is a collection error, never a skip
IMAGE_IDS = [img["id"] for img in _KIT.manifest["images"]]


def _u8(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB", f"{path}: kit tiles/frames are RGB PNGs, got {im.mode}"
        return np.asarray(im).copy()


def _pp(kit) -> dict:
    return kit.manifest["preprocess"]


def _pv_atol(kit) -> float:
    return float(kit.tolerances["pixel_values"]["atol"])


def _decoder_levels(kit) -> int:
    """Allowed |d| in uint8 levels for decoder-dependent pixels (manifest note: '|d| <= 2/255/std')."""
    m = re.search(r"\|d\|\s*<=\s*(\d+)\s*/\s*255", kit.tolerances["pixel_values"].get("note", ""))
    return int(m.group(1)) if m else 2


def _assert_stats(pv: torch.Tensor, stats: dict, atol: float) -> None:
    x = pv.detach().to(torch.float64).numpy()
    # float64 sums of float32 values within atol of the reference: allow atol per element, plus a
    # tiny relative slack for float64 summation order.
    n_tile = x[0].size

    def close(got: float, want: float, n: int, scale: float) -> bool:
        return math.isclose(got, want, rel_tol=0, abs_tol=atol * n + 1e-9 * scale)

    abs_scale = float(np.abs(x).sum())
    assert close(float(x.sum()), stats["sum"], x.size, abs_scale), (float(x.sum()), stats["sum"])
    assert close(float(x.mean()), stats["mean"], 1, 1.0), (float(x.mean()), stats["mean"])
    if "abs_sum" in stats:
        assert close(abs_scale, stats["abs_sum"], x.size, abs_scale), (abs_scale, stats["abs_sum"])
    got_tiles = x.reshape(x.shape[0], -1).sum(axis=1)
    assert len(got_tiles) == len(stats["per_tile_sum"])
    for t, (got, want) in enumerate(zip(got_tiles, stats["per_tile_sum"], strict=True)):
        assert close(float(got), want, n_tile, abs_scale), (t, float(got), want)


def _formula(tiles_u8: np.ndarray, kit) -> np.ndarray:
    """The manifest's pixel_values_from_tiles formula, computed independently in numpy float32."""
    mean = np.asarray(_pp(kit)["mean"], np.float32)[None, :, None, None]
    std = np.asarray(_pp(kit)["std"], np.float32)[None, :, None, None]
    return (tiles_u8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255) - mean) / std


# ------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("image_id", IMAGE_IDS)
def test_image_source_matches_manifest(kit, image_id):
    spec = kit.images[image_id]
    with Image.open(kit.path(spec["file"])) as im:
        assert list(im.size) == spec["size"]
        assert im.mode == spec["mode"]


@pytest.mark.parametrize("image_id", IMAGE_IDS)
def test_tiling_matches_manifest(kit, image_id):
    spec, pp = kit.images[image_id], _pp(kit)
    size = pp["input_size"]
    image = open_image(kit.path(spec["file"]))
    w, h = image.size
    cols, rows = find_closest_aspect_ratio(w / h, target_ratios(pp["min_num"], spec["max_num"]), w, h, size)
    assert [cols, rows] == spec["grid_cols_rows"]
    assert [cols * size, rows * size] == spec["resized_to"]

    tiles = dynamic_preprocess(
        image,
        min_num=pp["min_num"],
        max_num=spec["max_num"],
        image_size=size,
        use_thumbnail=pp["use_thumbnail"],
    )
    assert len(tiles) == spec["num_tiles"] == len(spec["tiles"])
    assert (len(tiles) == cols * rows + 1) == spec["has_thumbnail"]
    max_abs = kit.tolerances["tiles_uint8"]["max_abs"]
    for k, (tile, ref_file) in enumerate(zip(tiles, spec["tiles"], strict=True)):
        ours, ref = np.asarray(tile).astype(np.int16), _u8(kit.path(ref_file)).astype(np.int16)
        assert ours.shape == ref.shape == (size, size, 3), (k, ours.shape, ref.shape)
        diff = int(np.abs(ours - ref).max())
        assert diff <= max_abs, f"{image_id} tile {k} ({ref_file}): max |d| = {diff} > {max_abs}"


@pytest.mark.parametrize("image_id", IMAGE_IDS)
def test_pixel_values_match_manifest(kit, image_id):
    spec, pp = kit.images[image_id], _pp(kit)
    data = kit.path(spec["file"]).read_bytes()
    pv = load_image(
        data,
        max_num=spec["max_num"],
        image_size=pp["input_size"],
        use_thumbnail=pp["use_thumbnail"],
        min_num=pp["min_num"],
    )
    assert pv.dtype == torch.float32
    assert list(pv.shape) == spec["pixel_values_shape"]
    atol = _pv_atol(kit)

    # the formula applied to the kit's lossless tile PNGs
    ref_tiles = np.stack([_u8(kit.path(f)) for f in spec["tiles"]])
    assert np.abs(pv.numpy() - _formula(ref_tiles, kit)).max() <= atol
    # our normalization of the kit's own tiles is the formula, bit for bit
    from_ref_tiles = tiles_to_pixel_values([Image.fromarray(t) for t in ref_tiles])
    assert np.abs(from_ref_tiles.numpy() - _formula(ref_tiles, kit)).max() <= atol

    _assert_stats(pv, spec["pixel_values_stats"], atol)

    if "pixel_values_file" in spec:
        ref = kit.npy(spec["pixel_values_file"])
        assert list(ref.shape) == spec["pixel_values_shape"]
        dtype = spec.get("pixel_values_dtype", "float32")  # the manifest says how the file is stored
        assert ref.dtype == np.dtype(dtype), f"{spec['pixel_values_file']} is {ref.dtype}, the manifest says {dtype}"
        tol = atol if dtype == "float32" else float(kit.tolerances["pixel_values"][f"atol_{dtype}_files"])
        diff = float(np.abs(pv.numpy().astype(np.float64) - ref.astype(np.float64)).max())
        assert diff <= tol, f"{image_id}: pixel_values max |d| = {diff} > {tol}"


# -------------------------------------------------------------------------------------------- video


def _video_args(spec: dict) -> dict:
    args = dict(spec["load_video_args"])
    if args.get("bound") is not None:
        args["bound"] = tuple(args["bound"])
    return args


def test_video_frame_indices(kit):
    spec = kit.manifest["video"]
    dec, args = spec["decord"], _video_args(spec)
    assert dec["max_frame"] == dec["num_frames"] - 1
    # get_index alone, on the numbers decord reported to the reference
    idx = get_index(args["bound"], float(dec["avg_fps"]), dec["max_frame"], num_segments=args["num_segments"])
    assert idx.tolist() == spec["frame_indices"]
    # and end to end on the kit's MP4 with our decoder
    got, frames = read_video_frames(
        kit.path(spec["file"]), bound=args["bound"], num_segments=args["num_segments"]
    )
    assert got.tolist() == spec["frame_indices"]
    assert len(frames) == len(spec["decoded_frames"])


def test_video_decoded_frames(kit):
    """Our decode vs the frames decord gave the reference (decoder-dependent: within tolerance)."""
    spec, args = kit.manifest["video"], _video_args(kit.manifest["video"])
    _, frames = read_video_frames(
        kit.path(spec["file"]), bound=args["bound"], num_segments=args["num_segments"]
    )
    levels = _decoder_levels(kit)
    for k, (frame, ref_file) in enumerate(zip(frames, spec["decoded_frames"], strict=True)):
        ref = _u8(kit.path(ref_file)).astype(np.int16)
        ours = np.asarray(frame).astype(np.int16)
        assert list(frame.size) == spec["encoded"]["size"]
        assert ours.shape == ref.shape
        diff = int(np.abs(ours - ref).max())
        assert diff <= levels, f"frame {k} ({ref_file}): max |d| = {diff} levels > {levels}"


def test_video_pixel_values_from_kit_frames(kit):
    """Tiling + normalization of the kit's decoded frames reproduce the kit's tiles exactly."""
    spec, args = kit.manifest["video"], _video_args(kit.manifest["video"])
    max_abs = kit.tolerances["tiles_uint8"]["max_abs"]
    tiles, num_patches = [], []
    for ref_file in spec["decoded_frames"]:
        frame_tiles = dynamic_preprocess(
            Image.fromarray(_u8(kit.path(ref_file))),
            image_size=args["input_size"],
            use_thumbnail=True,
            max_num=args["max_num"],
        )
        tiles += frame_tiles
        num_patches.append(len(frame_tiles))
    assert num_patches == spec["num_patches_list"]
    assert len(tiles) == len(spec["tiles"])
    ref_tiles = np.stack([_u8(kit.path(f)) for f in spec["tiles"]])
    ours = np.stack([np.asarray(t) for t in tiles])
    assert ours.shape == ref_tiles.shape
    assert int(np.abs(ours.astype(np.int16) - ref_tiles.astype(np.int16)).max()) <= max_abs

    pv = tiles_to_pixel_values(tiles)
    assert list(pv.shape) == spec["pixel_values_shape"]
    assert np.abs(pv.numpy() - _formula(ref_tiles, kit)).max() <= _pv_atol(kit)
    _assert_stats(pv, spec["pixel_values_stats"], _pv_atol(kit))


def test_load_video_end_to_end(kit):
    """load_video on the MP4 (path and bytes) vs the pixel values of the kit's decoded frames."""
    spec, args = kit.manifest["video"], _video_args(kit.manifest["video"])
    path = kit.path(spec["file"])
    pv, num_patches = load_video(path, **args)
    assert num_patches == spec["num_patches_list"]
    assert list(pv.shape) == spec["pixel_values_shape"]
    pv_bytes, num_patches_bytes = load_video(path.read_bytes(), **args)
    assert num_patches_bytes == num_patches
    assert torch.equal(pv_bytes, pv)

    ref_tiles = np.stack([_u8(kit.path(f)) for f in spec["tiles"]])
    # decoder-dependent: |d| <= levels/255/std (plus the float32 rounding tolerance)
    std = np.asarray(_pp(kit)["std"], np.float32)[None, :, None, None]
    bound = _decoder_levels(kit) / 255 / std + _pv_atol(kit)
    assert (np.abs(pv.numpy() - _formula(ref_tiles, kit)) <= bound).all()
