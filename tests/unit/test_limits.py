"""The request rules both ends enforce (services/common/limits.py): tiling resolution and its bounds."""

from __future__ import annotations

import pytest

from services.common.limits import MAX_TILES_LIMIT, Tiling, resolve_tiling, video_segments_problem


def test_defaults_fill_unset_values():
    assert resolve_tiling(0, 0, None, default_max_tiles=12, default_use_thumbnail=True) == Tiling(12, 1, True)
    assert resolve_tiling(6, 2, False, default_max_tiles=12, default_use_thumbnail=True) == Tiling(6, 2, False)


@pytest.mark.parametrize(("max_tiles", "min_tiles", "problem"), [
    (MAX_TILES_LIMIT + 1, 0, f"max_tiles in [1, {MAX_TILES_LIMIT}] (0 = the default 12)"),
    (-1, 0, "got min_tiles=0, max_tiles=-1"),
    (4, 5, "need 1 <= min_tiles <= max_tiles"),
    (0, 13, "got min_tiles=13, max_tiles=0"),  # the bound is the resolved maximum (12)
    (0, -1, "min_tiles in [1, max_tiles] (0 = 1)"),
])
def test_out_of_range(max_tiles, min_tiles, problem):
    with pytest.raises(ValueError) as info:
        resolve_tiling(max_tiles, min_tiles, None, default_max_tiles=12, default_use_thumbnail=True)
    assert problem in str(info.value)


def test_video_segments():
    assert video_segments_problem(0) is None and video_segments_problem(64) is None
    assert "num_segments" in video_segments_problem(65) and video_segments_problem(-1)
