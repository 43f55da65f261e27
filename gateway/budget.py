"""What a turn's images will cost, counted before anything is encoded.

An image's tile count follows from the size its header declares and the tiling rules
(services/common/tiling.py, the encoder's own grid rule), a video's from the frame size its container
declares and the number of segments. From those counts the gateway refuses, with INVALID_ARGUMENT and
before any encode:
- a video (or an image) that the encoder would refuse as more tiles than one request may hold
  (ModelInfo.max_request_tiles);
- a conversation whose image tokens alone (tiles x the decoder's tokens per tile, earlier turns
  included) fill the decoder's context, which the decoder would refuse only after every image was
  encoded and sent;
- a `max_new_tokens` beyond the decoder's whole context.
Counts are lower bounds (an unreadable header counts 0 tiles: the encoder then says what is wrong), so
nothing the peers would accept is refused here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.grounding import image_size
from services.common.limits import DEFAULT_VIDEO_MAX_TILES, DEFAULT_VIDEO_SEGMENTS, Tiling, resolve_tiling
from services.common.tiling import known_tiles, video_tiles_problem
from services.common.video_probe import declared_video_size


class _TilingRequest(Protocol):
    max_tiles: int
    min_tiles: int
    use_thumbnail: bool | None


class _Video(Protocol):
    data: bytes
    num_segments: int


class _Turn(Protocol):
    images: tuple[bytes, ...]
    video: _Video | None
    tiling: _TilingRequest


@dataclass(frozen=True)
class EncoderFacts:
    """What the budget needs of vision ModelInfo."""

    image_size: int
    default_max_tiles: int
    default_use_thumbnail: bool
    max_request_tiles: int  # 0 = the encoder does not say

    @classmethod
    def of(cls, info) -> EncoderFacts:
        """From a vision_pb2.ModelInfo."""
        return cls(info.image_size, info.default_max_tiles, info.default_use_thumbnail, info.max_request_tiles)


@dataclass(frozen=True)
class DecoderFacts:
    """What the budget needs of DecoderInfo."""

    tokens_per_tile: int
    max_context: int

    @classmethod
    def of(cls, info) -> DecoderFacts:
        """From a decoder_pb2.DecoderInfo."""
        return cls(info.tokens_per_tile, info.max_context)


class BudgetError(ValueError):
    """The request cannot be served as sent; the message says what to change."""


def turn_tiles(turn: _Turn, encoder: EncoderFacts) -> int:
    """The tiles a user turn's images or video become (a lower bound); BudgetError if the encoder would
    refuse them."""
    video = turn.video is not None
    try:
        tiling = resolve_tiling(turn.tiling.max_tiles, turn.tiling.min_tiles, turn.tiling.use_thumbnail,
                                default_max_tiles=DEFAULT_VIDEO_MAX_TILES if video else encoder.default_max_tiles,
                                default_use_thumbnail=encoder.default_use_thumbnail)
    except ValueError as exc:
        raise BudgetError(str(exc)) from exc
    if turn.video is not None:
        segments = turn.video.num_segments or DEFAULT_VIDEO_SEGMENTS
        total = segments * known_tiles(declared_video_size(turn.video.data), tiling, encoder.image_size)
        problem = video_tiles_problem(total, segments, encoder.max_request_tiles)
        if problem:
            raise BudgetError(problem)
        return total
    return sum(_image_tiles(i, data, tiling, encoder) for i, data in enumerate(turn.images))


def _image_tiles(index: int, data: bytes, tiling: Tiling, encoder: EncoderFacts) -> int:
    size = image_size(data)
    tiles = known_tiles(None if size is None else (size.width, size.height), tiling, encoder.image_size)
    if 0 < encoder.max_request_tiles < tiles:  # the gateway encodes one image per request
        raise BudgetError(f"image {index} would be {tiles} tiles, over the vision encoder's limit of "
                          f"{encoder.max_request_tiles} per request: use a smaller tiling.max_tiles")
    return tiles


def check_turn_budget(turns: Iterable[_Turn], stored_tiles: Sequence[int], max_new_tokens: int,
                      encoder: EncoderFacts, decoder: DecoderFacts) -> None:
    """BudgetError unless the conversation's images fit the encoder and the decoder's context.

    `turns`: the user turns whose media the request carries (its history and this turn);
    `stored_tiles`: the tile counts of a session's earlier images (known from the session, not re-read).
    """
    if max_new_tokens > decoder.max_context > 0:
        raise BudgetError(f"max_new_tokens must be <= {decoder.max_context} (the decoder's context holds prompt "
                          f"+ answer), got {max_new_tokens}")
    tiles = sum(stored_tiles) + sum(turn_tiles(t, encoder) for t in turns)
    image_tokens = tiles * decoder.tokens_per_tile
    if decoder.max_context > 0 and image_tokens >= decoder.max_context:
        raise BudgetError(
            f"the images alone are {image_tokens} prompt tokens ({tiles} tiles x {decoder.tokens_per_tile}); the "
            f"decoder's context is {decoder.max_context} tokens (prompt + answer): use fewer or smaller images, a "
            "smaller tiling.max_tiles, fewer video segments, or a shorter history")
