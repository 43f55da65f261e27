"""How many tiles an image of a given size becomes: upstream's grid choice, pure and torch-free.

The encoder cuts images with `dynamic_preprocess` (services/vision_encoder/preprocess.py), which picks
its grid here; the gateway counts tiles here too, from the size an image's header declares, so it can
refuse a request whose images cannot fit the decoder's context, or whose video the encoder would
refuse, before anything is encoded. One grid rule, so the two never disagree.
"""

from __future__ import annotations

from services.common.limits import Tiling


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) grids with min_num <= cols*rows <= max_num, ordered as upstream.

    Upstream builds a Python ``set`` and stably sorts it by area, so grids of equal area keep the set's
    iteration order. That order decides near-ties in ``find_closest_aspect_ratio``, so the set is built
    the same way here (int-tuple hashes are deterministic in CPython, so the order is too).
    """
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda r: r[0] * r[1])


def find_closest_aspect_ratio(
    aspect_ratio: float,
    ratios: list[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    """Grid whose cols/rows is closest to ``aspect_ratio``.

    On an exact tie the later (larger) grid wins only if the image has enough pixels to fill more than
    half of it: ``width*height > 0.5 * image_size**2 * cols * rows`` (upstream's rule, so small images
    are not blown up onto many tiles).
    """
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff = diff
            best = ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def tile_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """(cols, rows) that `dynamic_preprocess` resizes a width x height image onto."""
    return find_closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, image_size)


def tile_count(width: int, height: int, tiling: Tiling, image_size: int) -> int:
    """Tiles (the thumbnail included) a width x height image becomes: what the encoder computes."""
    cols, rows = tile_grid(width, height, tiling.min_tiles, tiling.max_tiles, image_size)
    grid = cols * rows
    return grid + 1 if tiling.use_thumbnail and grid != 1 else grid


def max_tile_count(tiling: Tiling) -> int:
    """The most tiles any image can become with this tiling (when its size is not known)."""
    return tiling.max_tiles + 1 if tiling.use_thumbnail and tiling.max_tiles != 1 else tiling.max_tiles


def known_tiles(size: tuple[int, int] | None, tiling: Tiling, image_size: int) -> int:
    """`tile_count` of an image of `size` (width, height); 0 when the size is unknown (an unreadable
    header: the encoder will say what is wrong). Sums of these are lower bounds, safe to refuse on."""
    if size is None or size[0] < 1 or size[1] < 1:
        return 0
    return tile_count(size[0], size[1], tiling, image_size)


def video_tiles_problem(total_tiles: int, num_segments: int, limit: int) -> str | None:
    """Why a video whose `num_segments` sampled frames become `total_tiles` tiles is refused by an encoder
    that takes at most `limit` tiles per request (None: it fits, or `limit` is 0 = unknown)."""
    if limit < 1 or total_tiles <= limit:
        return None
    return (f"the video would be {total_tiles} tiles ({num_segments} segments at this tiling), over the vision "
            f"encoder's limit of {limit} tiles per request: use fewer video.num_segments or a smaller tiling.max_tiles")
