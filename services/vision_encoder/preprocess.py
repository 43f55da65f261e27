"""InternVL2 image and video preprocessing, numerically identical to upstream.

Reproduces the model-card pipeline of OpenGVLab/InternVL (commit 74126371): ``dynamic_preprocess``
tiling, ``build_transform`` (ToTensor + ImageNet Normalize), ``load_image``, ``get_index`` and
``load_video``. It uses PIL + numpy + torch only: torchvision is not a dependency, so ToTensor and
Normalize are re-expressed with the same float32 torch ops. The model's logits are very sensitive to
pixels (1/255 everywhere moves logits by ~0.3), so every choice below follows upstream exactly,
quirks included; the parity kit's goldens are the definition of correct.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# The grid choice and the container probe are pure (the torch-free gateway counts tiles with them too);
# re-exported here, where upstream's pipeline reads them.
from services.common.tiling import find_closest_aspect_ratio as find_closest_aspect_ratio
from services.common.tiling import target_ratios as target_ratios
from services.common.tiling import tile_grid, video_tiles_problem
from services.common.video_probe import damaged_chunk_offsets
from services.common.video_probe import declared_video_size as declared_video_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = bytes | str | Path | Image.Image


@dataclass(frozen=True)
class TilingConfig:
    """Dynamic-resolution tiling knobs (InternVL2 defaults: 448 px tiles, 1..12 tiles + thumbnail).

    Field names match ``dynamic_preprocess``'s keywords: ``dynamic_preprocess(img, **asdict(cfg))``.
    """

    image_size: int = 448
    min_num: int = 1
    max_num: int = 12
    use_thumbnail: bool = True


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Resize ``image`` onto the closest grid and cut it into ``image_size`` tiles (row-major).

    Uses PIL's default ``resize`` filter (BICUBIC, with PIL's support widening on downscale), which is
    what upstream uses; other resamplers differ by several levels. A whole-image thumbnail is appended
    only when there is more than one tile.
    """
    width, height = image.size
    cols, rows = tile_grid(width, height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def tiles_to_pixel_values(tiles: list[Image.Image]) -> torch.Tensor:
    """Stack tiles into normalized float32 ``[n, 3, H, W]`` pixel values.

    Same float32 ops as torchvision ``ToTensor`` + ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``:
    ``(float32(u8) / 255 - mean) / std``. Upstream's ``T.Resize((448, 448))`` is a no-op on tiles that
    are already that size and is therefore omitted; tiles must all have the same size.
    """
    if not tiles:
        raise ValueError("no tiles to convert")
    arr = np.stack([np.asarray(t.convert("RGB") if t.mode != "RGB" else t, dtype=np.uint8) for t in tiles])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub(mean).div(std)


def open_image(data: ImageInput) -> Image.Image:
    """Decode ``data`` (encoded bytes, a path, or a PIL image) into an RGB PIL image.

    Any mode is converted with ``.convert('RGB')`` like upstream: alpha is dropped (not composited),
    palettes are expanded, and 16-bit greyscale is clipped to 255. EXIF orientation is deliberately not
    applied, because upstream does not apply it.
    """
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise ValueError(f"cannot decode image: {exc}") from exc


def load_image(
    data: ImageInput,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
    min_num: int = 1,
) -> torch.Tensor:
    """Upstream ``load_image``: decode, tile, normalize. The tile count is ``result.shape[0]``."""
    tiles = dynamic_preprocess(
        open_image(data), min_num=min_num, max_num=max_num, image_size=image_size, use_thumbnail=use_thumbnail
    )
    return tiles_to_pixel_values(tiles)


def get_index(
    bound: tuple[float, float] | None,
    fps: float,
    max_frame: int,
    first_idx: int = 0,
    num_segments: int = 32,
) -> np.ndarray:
    """Frame indices at the centres of ``num_segments`` equal segments of ``[start, end]`` (upstream).

    Both Python ``round`` and ``np.round`` round half to even, and ``int`` truncates; these quirks pick
    the frames the goldens were computed from, so they are kept as they are.
    """
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return np.array([int(start_idx + seg_size / 2 + np.round(seg_size * idx)) for idx in range(num_segments)])


class FrameTooLarge(ValueError):
    """A video's frames are over the pixel cap (or absurdly thin); the message says by how much."""


class VideoTooManyTiles(FrameTooLarge):
    """A video's sampled frames would become more tiles than one request may hold."""


@dataclass(frozen=True)
class TileBudget:
    """The most tiles one video may become, and how many tiles a width x height frame becomes."""

    max_tiles: int
    tiles_for_size: Callable[[int, int], int]


# Beyond this width:height (either way) an image or frame is a strip, not a picture: rejected.
MAX_ASPECT_RATIO = 200


def check_image_size(width: int, height: int, max_pixels: int, what: str) -> str | None:
    """Why an image (or frame) of this size is refused, or None if it is fine. Needs no pixels."""
    if width < 1 or height < 1:
        return f"{what} has no pixels ({width}x{height})"
    if width * height > max_pixels:
        return (f"{what} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; "
                "downscale it")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"{what} is {width}x{height}, more elongated than {MAX_ASPECT_RATIO}:1; "
                "crop or pad it to a less extreme aspect ratio")
    return None


def read_video_frames(
    source: bytes | str | Path,
    bound: tuple[float, float] | None = None,
    num_segments: int = 32,
    max_pixels: int | None = None,
    budget: TileBudget | None = None,
) -> tuple[np.ndarray, list[Image.Image]]:
    """Decode the frames upstream's ``load_video`` samples: ``(frame_indices, RGB frames)``.

    Uses decord like upstream (``ctx=cpu(0)``, one thread, one ``vr[i]`` per frame), so the decoded
    pixels match the reference; other decoders may differ by a level or two in YUV->RGB. Bytes are
    handed to decord as a file-like object, which it reads in memory (no temp file needed).

    With ``max_pixels``, frames over the cap (or over ``MAX_ASPECT_RATIO``) raise FrameTooLarge: checked
    on the size the container declares before decord opens the file, and again on every decoded frame
    before the next one is decoded (a stream may lie or change size), so at most one oversized frame
    is ever decoded.

    With ``budget``, the frames' total tile count is checked the same way: on the declared size before
    anything is decoded, then after each decoded frame, counting the frames still to come at that
    frame's size, so a video bound to be refused costs at most one decoded frame, never its tiles.
    """
    from decord import DECORDError, VideoReader, cpu  # heavy native import, only needed for video

    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ValueError("empty video input")
        damage = damaged_chunk_offsets(source)
        if damage:
            raise ValueError(f"the video container is damaged: {damage}")
        declared = declared_video_size(source) if max_pixels is not None or budget is not None else None
        if declared is not None and max_pixels is not None:
            _check_frame(*declared, max_pixels, "the video's frames (as its container declares them)")
        if declared is not None and budget is not None:
            _check_tiles(budget, budget.tiles_for_size(*declared) * num_segments, num_segments)
        uri: io.BytesIO | str = io.BytesIO(source)
    else:
        uri = str(source)
        if not Path(uri).is_file():
            raise FileNotFoundError(uri)
    try:
        vr = VideoReader(uri, ctx=cpu(0), num_threads=1)
    except (DECORDError, RuntimeError, AssertionError) as exc:  # bad data raises RuntimeError
        raise ValueError(f"cannot decode video: {exc}") from exc
    if len(vr) == 0:
        raise ValueError("video has no frames")

    max_frame = len(vr) - 1
    indices = get_index(bound, float(vr.get_avg_fps()), max_frame, first_idx=0, num_segments=num_segments)
    if indices.min() < 0 or indices.max() > max_frame:
        raise ValueError(f"bound {bound} selects frames outside the video (0..{max_frame})")
    frames = []
    tiles = 0
    for i, idx in enumerate(indices):
        try:
            array = vr[int(idx)].asnumpy()
        except (DECORDError, RuntimeError) as exc:
            raise ValueError(f"cannot decode video frame {int(idx)}: {exc}") from exc
        if max_pixels is not None:
            _check_frame(array.shape[1], array.shape[0], max_pixels, f"video frame {int(idx)}")
        if budget is not None:
            this_frame = budget.tiles_for_size(array.shape[1], array.shape[0])
            tiles += this_frame
            _check_tiles(budget, tiles + this_frame * (num_segments - i - 1), num_segments)
        frames.append(Image.fromarray(array).convert("RGB"))
    return indices, frames


def _check_frame(width: int, height: int, max_pixels: int, what: str) -> None:
    problem = check_image_size(width, height, max_pixels, what)
    if problem is not None:
        raise FrameTooLarge(problem)


def _check_tiles(budget: TileBudget, total: int, num_segments: int) -> None:
    problem = video_tiles_problem(total, num_segments, budget.max_tiles)
    if problem is not None:
        raise VideoTooManyTiles(problem)


def load_video(
    source: bytes | str | Path,
    bound: tuple[float, float] | None = None,
    input_size: int = 448,
    max_num: int = 1,
    num_segments: int = 32,
) -> tuple[torch.Tensor, list[int]]:
    """Upstream ``load_video``: sample ``num_segments`` frames with decord, tile each, normalize.

    Returns ``(pixel_values, num_patches_list)`` where ``num_patches_list[i]`` is frame i's tile count
    (1 per frame with upstream's ``max_num=1``).
    """
    _, frames = read_video_frames(source, bound=bound, num_segments=num_segments)
    pixel_values, num_patches = [], []
    for frame in frames:
        tiles = dynamic_preprocess(frame, image_size=input_size, use_thumbnail=True, max_num=max_num)
        pixel_values.append(tiles_to_pixel_values(tiles))
        num_patches.append(len(tiles))
    return torch.cat(pixel_values), num_patches
