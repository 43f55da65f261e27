"""read_video_frames and load_video on the kit's real MP4 (320x240, 61 frames, 24 fps): defaults, bounds at
the video's ends, refusal messages, and the tile budget checked on the declared and on each decoded frame."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from services.vision_encoder.preprocess import (
    FrameTooLarge,
    TileBudget,
    VideoTooManyTiles,
    get_index,
    load_video,
    read_video_frames,
    tiles_to_pixel_values,
)
from tests.conftest import load_kit

KIT = load_kit()
WIDTH, HEIGHT = KIT.video["encoded"]["size"]


@pytest.fixture(scope="module")
def video() -> bytes:
    return KIT.path(KIT.video["file"]).read_bytes()


def declaring(video: bytes, width: int, height: int) -> bytes:
    """The same video whose container declares another frame size (decord still decodes the real frames)."""
    data = bytearray(video)
    entry = data.index(b"stsd") + 4 + 8
    struct.pack_into(">HH", data, entry + 32, width, height)
    return bytes(data)


def test_defaults_sample_32_frames_from_the_first():
    indices, frames = read_video_frames(KIT.path(KIT.video["file"]))
    assert len(frames) == 32 and indices[0] == 0
    assert list(indices) == list(get_index(None, 24.0, 60))
    assert all(frame.mode == "RGB" and frame.size == (WIDTH, HEIGHT) for frame in frames)


def test_one_segment_is_allowed_and_zero_is_refused(video):
    assert len(read_video_frames(video, num_segments=1)[1]) == 1
    with pytest.raises(ValueError, match="^num_segments must be >= 1, got 0$"):
        read_video_frames(video, num_segments=0)


def test_bad_sources_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="^empty video input$"):
        read_video_frames(b"")
    missing = tmp_path / "missing.mp4"
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video_frames(missing)
    with pytest.raises(ValueError, match="^cannot decode video: "):
        read_video_frames(b"not a video" * 100)


def test_a_bound_on_the_last_frame_and_beyond(video):
    last = 60 / 24  # the last frame's time: the bound selects frame 60 = max_frame, which is inside
    indices, frames = read_video_frames(video, bound=(last, 10.0), num_segments=1)
    assert list(indices) == [60] and len(frames) == 1
    with pytest.raises(ValueError, match=r"^bound \(5\.0, 10\.0\) selects frames outside the video \(0\.\.60\)$"):
        read_video_frames(video, bound=(5.0, 10.0), num_segments=2)


def test_a_bound_picks_its_frames(video):
    indices, _ = read_video_frames(video, bound=(1.0, 2.0), num_segments=2)
    assert list(indices) == list(get_index((1.0, 2.0), 24.0, 60, num_segments=2)) == [30, 42]


class Tally:
    """A TileBudget.tiles_for_size that records each (width, height) asked and answers from `answers` in turn."""

    def __init__(self, answers: list[int]):
        self.answers = iter(answers)
        self.asked: list[tuple[int, int]] = []

    def __call__(self, width: int, height: int) -> int:
        self.asked.append((width, height))
        return next(self.answers)


def test_the_declared_size_is_checked_before_decoding(video):
    tally = Tally([5])
    with pytest.raises(VideoTooManyTiles, match=r"would be 10 tiles \(2 segments at this tiling\), over .* 9 tiles"):
        read_video_frames(declaring(video, 16, 16), num_segments=2, budget=TileBudget(9, tally))
    assert tally.asked == [(16, 16)]  # nothing decoded


def test_the_budget_counts_each_decoded_frame(video):
    tally = Tally([1, 1, 1, 1, 1])  # declared, then 4 frames
    indices, frames = read_video_frames(video, num_segments=4, budget=TileBudget(4, tally))
    assert len(frames) == 4
    assert tally.asked == [(WIDTH, HEIGHT)] * 5


@pytest.mark.parametrize(("limit", "refused"), [(9, True), (10, False)])
def test_a_frame_that_grows_is_refused_counting_the_frames_to_come(video, limit, refused):
    # Declared: 1 tile a frame (4 in all). Decoded: 1, then 3 a frame: 1 + 3 + 3*2 = 10 once frame 2 is seen.
    tally = Tally([1, 1, 3, 3, 3])
    if refused:
        with pytest.raises(VideoTooManyTiles, match=r"would be 10 tiles \(4 segments at this tiling\)"):
            read_video_frames(video, num_segments=4, budget=TileBudget(limit, tally))
        assert len(tally.asked) == 3  # stopped at the second decoded frame
    else:
        assert len(read_video_frames(video, num_segments=4, budget=TileBudget(limit, tally))[1]) == 4


def test_load_video_defaults_one_448_tile_per_frame(video):
    pixel_values, patches = load_video(video)
    assert pixel_values.shape == (32, 3, 448, 448) and patches == [1] * 32


def test_load_video_tiles_each_frame_with_a_thumbnail(video):
    pixel_values, patches = load_video(video, max_num=6, num_segments=2, input_size=224)
    assert patches == [7, 7]  # 4:3 frames on a 3x2 grid, plus the thumbnail
    assert pixel_values.shape == (14, 3, 224, 224)


def test_load_video_honours_the_bound(video):
    pixel_values, _ = load_video(video, bound=(1.0, 2.0), num_segments=2)
    _, frames = read_video_frames(video, bound=(1.0, 2.0), num_segments=2)
    expected = tiles_to_pixel_values([frame.resize((448, 448)) for frame in frames])
    np.testing.assert_array_equal(pixel_values.numpy(), expected.numpy())


def test_the_declared_size_refusal_names_the_container(video):
    expected = (r"^the video's frames \(as its container declares them\) is 2000x1000 = 2000000 pixels, "
                r"over the limit of 1000000; downscale it$")
    with pytest.raises(FrameTooLarge, match=expected):
        read_video_frames(declaring(video, 2000, 1000), num_segments=2, max_pixels=1_000_000)
