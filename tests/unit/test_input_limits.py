"""Size limits checked without decoding: image and video frame sizes, from headers and containers."""

from __future__ import annotations

import struct

import pytest

from services.vision_encoder.preprocess import (
    MAX_ASPECT_RATIO,
    FrameTooLarge,
    check_image_size,
    declared_video_size,
    read_video_frames,
)
from tests.conftest import load_kit

KIT = load_kit()


@pytest.fixture(scope="module")
def video() -> bytes:
    return KIT.path(KIT.video["file"]).read_bytes()


def video_declaring(video: bytes, width: int, height: int) -> bytes:
    data = bytearray(video)
    entry = data.index(b"stsd") + 4 + 8
    struct.pack_into(">HH", data, entry + 32, width, height)
    return bytes(data)


def test_declared_video_size_reads_the_sample_entry(video):
    assert declared_video_size(video) == tuple(KIT.video["encoded"]["size"])
    assert declared_video_size(video_declaring(video, 640, 480)) == (640, 480)


@pytest.mark.parametrize(
    "data", [lambda v: b"", lambda v: b"garbage" * 100, lambda v: v[:100], lambda v: b"\0\0\0\x01moov" + b"\xff" * 20],
    ids=["empty", "garbage", "video head", "bare moov"],
)
def test_declared_video_size_is_none_for_anything_else(video, data):
    assert declared_video_size(data(video)) is None


def test_declared_frame_size_over_the_cap_is_refused_before_decoding(video):
    with pytest.raises(FrameTooLarge, match="as its container declares them"):
        read_video_frames(video_declaring(video, 20000, 20000), num_segments=2, max_pixels=40_000_000)


def test_a_container_that_understates_is_caught_at_the_first_decoded_frame(video):
    width, height = KIT.video["encoded"]["size"]
    lying = video_declaring(video, 16, 16)  # decord decodes the real frames anyway
    with pytest.raises(FrameTooLarge, match=rf"video frame \d+ is {width}x{height}"):
        read_video_frames(lying, num_segments=2, max_pixels=width * height - 1)
    _, frames = read_video_frames(lying, num_segments=2, max_pixels=width * height)
    assert frames[0].size == (width, height)


@pytest.mark.parametrize(
    ("size", "problem"),
    [((0, 5), "no pixels"), ((5, 0), "no pixels"), ((5000, 5000), "over the limit of 1000000"),
     ((1, MAX_ASPECT_RATIO + 1), "more elongated"), ((MAX_ASPECT_RATIO + 1, 1), "more elongated")],
)
def test_check_image_size_refuses(size, problem):
    assert problem in check_image_size(*size, 1_000_000, "images[0]")


@pytest.mark.parametrize("size", [(1, 1), (1, MAX_ASPECT_RATIO), (1000, 1000), (37, 23)])
def test_check_image_size_accepts(size):
    assert check_image_size(*size, 1_000_000, "images[0]") is None
