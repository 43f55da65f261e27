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
VIDEO = KIT.path(KIT.manifest["video"]["file"]).read_bytes()
WIDTH, HEIGHT = KIT.manifest["video"]["encoded"]["size"]


def video_declaring(width: int, height: int) -> bytes:
    data = bytearray(VIDEO)
    entry = data.index(b"stsd") + 4 + 8
    struct.pack_into(">HH", data, entry + 32, width, height)
    return bytes(data)


def test_declared_video_size_reads_the_sample_entry():
    assert declared_video_size(VIDEO) == (WIDTH, HEIGHT)
    assert declared_video_size(video_declaring(640, 480)) == (640, 480)


@pytest.mark.parametrize("data", [b"", b"garbage" * 100, VIDEO[:100], b"\0\0\0\x01moov" + b"\xff" * 20])
def test_declared_video_size_is_none_for_anything_else(data):
    assert declared_video_size(data) is None


def test_declared_frame_size_over_the_cap_is_refused_before_decoding():
    with pytest.raises(FrameTooLarge, match="as its container declares them"):
        read_video_frames(video_declaring(20000, 20000), num_segments=2, max_pixels=40_000_000)


def test_a_container_that_understates_is_caught_at_the_first_decoded_frame():
    lying = video_declaring(16, 16)  # decord decodes the real 320x240 frames anyway
    with pytest.raises(FrameTooLarge, match=rf"video frame \d+ is {WIDTH}x{HEIGHT}"):
        read_video_frames(lying, num_segments=2, max_pixels=WIDTH * HEIGHT - 1)
    _, frames = read_video_frames(lying, num_segments=2, max_pixels=WIDTH * HEIGHT)
    assert frames[0].size == (WIDTH, HEIGHT)


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
