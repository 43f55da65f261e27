"""Request rules that both ends of a call enforce, stated once (torch-free: the gateway imports it).

Tiling: the gateway builds feature-cache keys from the tiling it resolves, the encoder tiles with the
tiling it resolves; both resolve it here, so a key never describes settings the encoder did not use.
Sampling: the gateway checks values before any image is encoded (a doomed request costs nothing),
the decoder checks them again for its other callers, and the engine's `SamplingParams` once more;
all three use `sampling_problem`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Upstream InternVL2 evaluates with up to 40 tiles (max_num=40 in some benchmarks); more is a mistake.
MAX_TILES_LIMIT = 40
DEFAULT_VIDEO_MAX_TILES = 1  # upstream load_video(max_num=1): one tile per frame
DEFAULT_VIDEO_SEGMENTS = 8  # upstream load_video(num_segments=8)
MAX_VIDEO_SEGMENTS = 64
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_CACHE_SALT_CHARS = 128  # GenerateSetup.cache_salt: a tenant's hash, not a place to ship data


@dataclass(frozen=True)
class Tiling:
    """Resolved tiling of one image (or of every frame of a video): upstream's max_num, min_num, thumbnail."""

    max_tiles: int
    min_tiles: int
    use_thumbnail: bool


def resolve_tiling(
    max_tiles: int, min_tiles: int, use_thumbnail: bool | None, *, default_max_tiles: int,
    default_use_thumbnail: bool,
) -> Tiling:
    """The tiling a request asks for, 0 / None meaning the default; ValueError says what to fix."""
    resolved_max = max_tiles or default_max_tiles
    if not (0 <= max_tiles <= MAX_TILES_LIMIT and 0 <= min_tiles <= resolved_max):
        raise ValueError(f"tiling: need 1 <= min_tiles <= max_tiles <= {MAX_TILES_LIMIT}, i.e. max_tiles in "
                         f"[1, {MAX_TILES_LIMIT}] (0 = the default {default_max_tiles}) and min_tiles in "
                         f"[1, max_tiles] (0 = 1); got min_tiles={min_tiles}, max_tiles={max_tiles}")
    return Tiling(resolved_max, min_tiles or 1, default_use_thumbnail if use_thumbnail is None else use_thumbnail)


def video_segments_problem(num_segments: int) -> str | None:
    if not 0 <= num_segments <= MAX_VIDEO_SEGMENTS:
        return (f"video.num_segments must be in 1..{MAX_VIDEO_SEGMENTS} (0 = the default {DEFAULT_VIDEO_SEGMENTS}), "
                f"got {num_segments}")
    return None


def sampling_problem(
    *, max_new_tokens: int = 0, temperature: float | None = None, top_p: float | None = None,
    top_k: int | None = None, repetition_penalty: float | None = None, stop: tuple[str, ...] = (),
    stop_token_ids: tuple[int, ...] = (),
) -> str | None:
    """What is wrong with these sampling values (None: nothing); unset values are the defaults.

    `max_new_tokens` 0 means the server default; its upper bound (the context) is the decoder's to check.
    """
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if value is not None and not math.isfinite(value):
            return f"{name} must be a finite number, got {value}"
    if max_new_tokens < 0:
        return f"max_new_tokens must be >= 0 (0 = the server default), got {max_new_tokens}"
    if temperature is not None and temperature < 0:
        return f"temperature must be >= 0 (0 = greedy), got {temperature}"
    if top_p is not None and not 0 < top_p <= 1:
        return f"top_p must be in (0, 1], got {top_p}"
    if top_k is not None and top_k < 0:
        return f"top_k must be >= 0 (0 = off), got {top_k}"
    if repetition_penalty is not None and repetition_penalty <= 0:
        return f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}"
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in stop):
        return f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_STRING_CHARS} characters"
    if any(not s for s in stop):
        return "stop strings must be non-empty"
    if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        return f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS}, got {len(stop_token_ids)}"
    if any(t < 0 for t in stop_token_ids):
        return "stop_token_ids must be >= 0 (token ids of the model's vocabulary)"
    return None


def proto_sampling_problem(params) -> str | None:
    """`sampling_problem` for a `decoder_pb2.SamplingParams` (unset optional fields = defaults)."""

    def opt(name: str):
        return getattr(params, name) if params.HasField(name) else None

    return sampling_problem(max_new_tokens=params.max_new_tokens, temperature=opt("temperature"),
                            top_p=opt("top_p"), top_k=opt("top_k"), repetition_penalty=opt("repetition_penalty"),
                            stop=tuple(params.stop), stop_token_ids=tuple(params.stop_token_ids))
