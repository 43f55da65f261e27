"""The gateway's pre-encode budget (gateway/budget.py) and the pure tile count it shares with the encoder."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

import pytest
from PIL import Image

from gateway.budget import BudgetError, DecoderFacts, EncoderFacts, check_turn_budget, turn_tiles
from services.common.limits import Tiling
from services.common.tiling import known_tiles, max_tile_count, tile_count, video_tiles_problem
from services.vision_encoder.preprocess import dynamic_preprocess
from tests.conftest import load_kit

ENCODER = EncoderFacts(image_size=448, default_max_tiles=12, default_use_thumbnail=True, max_request_tiles=256)
DECODER = DecoderFacts(tokens_per_tile=256, max_context=8192)


@dataclass(frozen=True)
class TilingAsked:
    max_tiles: int = 0
    min_tiles: int = 0
    use_thumbnail: bool | None = None


@dataclass(frozen=True)
class Video:
    data: bytes
    num_segments: int = 0


@dataclass(frozen=True)
class Turn:
    images: tuple[bytes, ...] = ()
    video: Video | None = None
    tiling: TilingAsked = field(default_factory=TilingAsked)


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(448, 448), (800, 600), (1000, 100), (100, 1000), (1920, 1080), (30, 30),
                                  (449, 448), (600, 335)])
@pytest.mark.parametrize("tiling", [Tiling(12, 1, True), Tiling(40, 1, True), Tiling(6, 2, False), Tiling(1, 1, True)])
def test_tile_count_is_what_the_encoder_cuts(size, tiling):
    image = Image.new("RGB", size)
    tiles = dynamic_preprocess(image, min_num=tiling.min_tiles, max_num=tiling.max_tiles, image_size=448,
                               use_thumbnail=tiling.use_thumbnail)
    assert tile_count(*size, tiling, 448) == len(tiles)
    assert len(tiles) <= max_tile_count(tiling)


def test_unknown_sizes_count_nothing():
    assert known_tiles(None, Tiling(12, 1, True), 448) == 0
    assert known_tiles((800, 600), Tiling(12, 1, True), 448) == tile_count(800, 600, Tiling(12, 1, True), 448)


def test_video_tiles_problem_names_the_fix():
    assert video_tiles_problem(256, 16, 256) is None and video_tiles_problem(10_000, 64, 0) is None
    problem = video_tiles_problem(257, 16, 256)
    assert "257 tiles" in problem and "limit of 256" in problem and "num_segments" in problem


def test_images_beyond_the_context_are_refused_before_encoding():
    big = png(1600, 1200)  # 4:3 at max 12 tiles: a 4x3 grid + thumbnail = 13 tiles = 3,328 tokens
    assert tile_count(1600, 1200, Tiling(12, 1, True), 448) == 13
    check_turn_budget([Turn(images=(big, big))], [], 0, ENCODER, DECODER)  # 6,656 < 8,192
    with pytest.raises(BudgetError, match="images alone are 9984 prompt tokens \\(39 tiles x 256\\)"):
        check_turn_budget([Turn(images=(big, big, big))], [], 0, ENCODER, DECODER)
    # Earlier turns count: a session's stored tiles, and the history a stateless client sends.
    with pytest.raises(BudgetError, match="context is 8192"):
        check_turn_budget([Turn(images=(big,))], [13, 6], 0, ENCODER, DECODER)
    check_turn_budget([Turn(images=(big,))], [13, 5], 0, ENCODER, DECODER)  # 31 tiles = 7,936 tokens
    with pytest.raises(BudgetError):
        check_turn_budget([Turn(images=(big, big)), Turn(images=(big,))], [], 0, ENCODER, DECODER)
    # The tiling asked for is the one counted.
    check_turn_budget([Turn(images=(big,) * 3, tiling=TilingAsked(max_tiles=6))], [], 0, ENCODER, DECODER)


def test_unreadable_images_are_left_to_the_encoder():
    check_turn_budget([Turn(images=(b"not an image",) * 16)], [], 0, ENCODER, DECODER)


def test_max_new_tokens_beyond_the_context():
    check_turn_budget([Turn(images=(png(10, 10),))], [], 8192, ENCODER, DECODER)
    with pytest.raises(BudgetError, match="max_new_tokens must be <= 8192"):
        check_turn_budget([Turn(images=(png(10, 10),))], [], 8193, ENCODER, DECODER)


def test_one_image_beyond_the_encoders_request_limit():
    small_encoder = EncoderFacts(448, 12, True, max_request_tiles=8)
    with pytest.raises(BudgetError, match="image 1 would be 13 tiles"):
        turn_tiles(Turn(images=(png(10, 10), png(1600, 1200))), small_encoder)


def video_declaring(width: int, height: int) -> bytes:
    """The kit's video with its container (avc1 sample entry) claiming another frame size."""
    kit = load_kit()
    data = bytearray(kit.path(kit.manifest["video"]["file"]).read_bytes())
    entry = data.index(b"stsd") + 4 + 8
    assert data[entry + 4 : entry + 8] == b"avc1"
    struct.pack_into(">HH", data, entry + 32, width, height)
    return bytes(data)


def test_video_segments_times_tiles_beyond_the_encoder():
    video = video_declaring(320, 240)  # 4:3 -> 4x3 grid + thumbnail = 13 tiles per frame at max_tiles 40
    assert turn_tiles(Turn(video=Video(video, 16), tiling=TilingAsked(max_tiles=40)), ENCODER) == 16 * 13
    with pytest.raises(BudgetError, match="would be 832 tiles \\(64 segments"):
        turn_tiles(Turn(video=Video(video, 64), tiling=TilingAsked(max_tiles=40)), ENCODER)
    assert turn_tiles(Turn(video=Video(video, 64)), ENCODER) == 64  # one tile per frame by default
    assert turn_tiles(Turn(video=Video(b"no container", 64), tiling=TilingAsked(max_tiles=40)), ENCODER) == 0


def test_bad_tiling_is_an_error_with_the_rule():
    with pytest.raises(BudgetError, match="tiling"):
        turn_tiles(Turn(images=(png(10, 10),), tiling=TilingAsked(max_tiles=41)), ENCODER)
