"""The `internvl.v1.VisionEncoder` gRPC service: bytes in, embeddings streamed out in chunks.

`Encode` decodes and tiles images (or samples and tiles video frames) in a thread pool, hands all
of a request's tiles to the shared `Batcher` at once (so admission is all-or-nothing), and streams,
per output item, an `EmbeddingHeader` followed by `chunk` messages of at most `chunk_bytes`.

Errors the caller can fix are INVALID_ARGUMENT with a message naming the field; a full queue is
RESOURCE_EXHAUSTED with a `retry-after-ms` hint in the trailing metadata; anything else is logged
and answered INTERNAL. No input may take the process down:
- images: only PNG, JPEG (MPO included), WebP, GIF, BMP and TIFF are opened (no plugin that shells out
  or parses exotic formats); the pixel cap and the aspect-ratio limit are checked on the size the
  file's header declares, before any pixel is decoded (decompression bombs);
- animated images (GIF, WebP, APNG, multi-page TIFF) are read as their first frame, exactly as
  upstream's `Image.open(...).convert('RGB')` does; the other frames are never decoded;
- videos: the frame size the container declares is checked before decord opens the file, and
  every decoded frame is checked before the next is decoded;
- tiles: a request's tile count (images: from their headers; video: segments x the declared, then
  decoded, frame size) is checked against the most one request may hold (`--max-queued-tiles`, also
  reported as ModelInfo.max_request_tiles) before any tile is cut, so an oversized request costs a
  header read (or one decoded frame), never gigabytes of pixel values.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import grpc
import torch
from PIL import Image, UnidentifiedImageError

from internvl.v1 import tensor_pb2, vision_pb2, vision_pb2_grpc
from services.common.checkpoint import parse_dtype, resolve_model_dir
from services.common.device_memory import device_memory
from services.common.engine_health import EngineHealth, EngineHealthConfig
from services.common.fingerprint import model_fingerprint
from services.common.fit import DeviceMemory
from services.common.limits import DEFAULT_VIDEO_MAX_TILES, Tiling, resolve_tiling
from services.common.model_config import InternVLConfig
from services.common.model_identity import CUSTOM_MEMBER, family_member_of_dir, model_name, vision_fingerprint
from services.common.tensors import TORCH_TO_WIRE, tensor_to_wire
from services.common.tiling import known_tiles, tile_count
from services.common.wire import DTYPE_NAMES, ITEMSIZE, iter_chunks
from services.vision_encoder.batcher import Batcher, BatcherClosed, ForwardFn, Overloaded, TooLarge
from services.vision_encoder.config import EncoderConfig
from services.vision_encoder.fit_check import check_encoder_fits
from services.vision_encoder.model import load_vision_encoder
from services.vision_encoder.preprocess import (
    FrameTooLarge,
    TileBudget,
    TilingConfig,
    check_image_size,
    dynamic_preprocess,
    open_image,
    read_video_frames,
    tiles_to_pixel_values,
)

log = logging.getLogger(__name__)
ENGINE_STEP = "encoder batch"  # what engine health counts, for its log lines

SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name
# get_index's own defaults for an open bound (seconds).
_OPEN_START, _OPEN_END = -100000.0, 100000.0
# Pillow formats accepted (Image.open(formats=...)): the common ones, nothing that shells out (EPS)
# or drags in rarely exercised parsers. "JPEG" also opens phones' multi-picture JPEGs (MPO).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"
# Sent with RESOURCE_EXHAUSTED: the queue drains within a few forward passes.
RETRY_AFTER_MS = "500"


class InvalidInput(ValueError):
    """The request is malformed; the message says what to fix (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class ModelRuntime:
    """Everything loaded once at start: the forward function and the facts GetModelInfo reports."""

    forward: ForwardFn
    model_config: InternVLConfig
    wire_dtype: int  # the compute dtype, as a tensor_pb2.DType
    fingerprint: str
    # Counts failed forward passes (services/common/engine_health.py).
    health: EngineHealth = field(default_factory=lambda: EngineHealth(EngineHealthConfig(), ENGINE_STEP))
    vision_fingerprint: str = ""  # "" = feature keys use `fingerprint` (services/common/model_identity.py)
    family_member: str = CUSTOM_MEMBER

    @classmethod
    def load(cls, config: EncoderConfig, memory: DeviceMemory | None = None) -> ModelRuntime:
        """Blocking (seconds to minutes): run it in a worker thread while health is NOT_SERVING.

        Refuses (`ModelDoesNotFit`) before reading any weight when the tower cannot fit the device;
        `memory` stands for the device's (default: measured, services/common/device_memory.py).
        """
        device = config.resolved_device()
        dtype = parse_dtype(config.dtype, device)
        root = resolve_model_dir(config.model)
        started = time.monotonic()
        check_encoder_fits(config, InternVLConfig.from_dir(root), device, dtype, memory or device_memory(device))
        encoder = load_vision_encoder(root, device=device, dtype=dtype)
        wire_dtype = TORCH_TO_WIRE[dtype]
        fingerprint = model_fingerprint(root, DTYPE_NAMES[wire_dtype])
        tower = vision_fingerprint(root, DTYPE_NAMES[wire_dtype])

        def forward(pixel_values: torch.Tensor) -> torch.Tensor:
            # Runs in the batcher's thread; the copy back to CPU happens here too, so the event loop
            # never waits on the device.
            return encoder.extract_feature(pixel_values.to(encoder.device)).cpu()

        # Warm-up: the first pass pays for kernel selection / allocator growth, not a user request.
        size = encoder.config.image_size
        with torch.inference_mode():
            forward(torch.zeros(1, 3, size, size))
        log.info(
            "loaded vision encoder from %s on %s in %s (fingerprint %s) in %.1fs",
            root,
            device,
            DTYPE_NAMES[wire_dtype],
            fingerprint,
            time.monotonic() - started,
        )
        health = EngineHealth(config.engine_health_config(), ENGINE_STEP)
        return cls(health.fault.wrap(forward), encoder.config, wire_dtype, fingerprint, health, tower,
                   family_member_of_dir(root))


@dataclass(frozen=True)
class _Item:
    """One output item: an image, or one sampled video frame, as normalised tiles."""

    pixel_values: torch.Tensor  # [tiles, 3, H, W] float32
    frame_index: int = 0

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


@dataclass(frozen=True)
class _Abort:
    """A status to end the call with, decided inside `except` and raised outside it."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, str], ...] = ()


class VisionEncoderServicer(vision_pb2_grpc.VisionEncoderServicer):
    def __init__(self, config: EncoderConfig):
        self.config = config
        self._runtime: ModelRuntime | None = None
        self._batcher: Batcher | None = None
        # Requests decoding at once. Decoded pixel values are held until the batcher admits or
        # rejects them, so this (with max_queued_tiles) bounds the memory they take.
        self._preprocess_slots = asyncio.Semaphore(2 * config.preprocess_threads)
        self._pool = ThreadPoolExecutor(
            max_workers=config.preprocess_threads, thread_name_prefix="preprocess"
        )

    def attach(self, runtime: ModelRuntime) -> None:
        """Start serving with a loaded model (until then every call is UNAVAILABLE)."""
        self._batcher = Batcher(
            runtime.forward,
            max_batch_tiles=self.config.max_batch_tiles,
            batch_wait_ms=self.config.batch_wait_ms,
            max_queued_tiles=self.config.max_queued_tiles,
            on_batch=runtime.health.record,
        )
        self._runtime = runtime

    @property
    def batcher(self) -> Batcher | None:
        return self._batcher

    @property
    def runtime(self) -> ModelRuntime | None:
        return self._runtime

    async def probe(self) -> None:
        """One throwaway blank tile through the batcher (the engine-health probe)."""
        assert self._runtime is not None and self._batcher is not None, "probed before the model was loaded"
        size = self._runtime.model_config.image_size
        await self._batcher.submit(torch.zeros(1, 3, size, size))

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def GetModelInfo(
        self, request: vision_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.ModelInfo:
        runtime = await self._require_runtime(context)
        mc = runtime.model_config
        return vision_pb2.ModelInfo(
            fingerprint=runtime.fingerprint,
            image_size=mc.image_size,
            tokens_per_tile=mc.num_image_token,
            hidden_size=mc.llm.hidden_size,
            default_max_tiles=mc.max_dynamic_patch,
            default_use_thumbnail=mc.use_thumbnail,
            dtype=runtime.wire_dtype,
            max_request_tiles=self.config.max_request_tiles,
            model_name=model_name(self.config.model),
            family_member=runtime.family_member,
            vision_fingerprint=runtime.vision_fingerprint,
        )

    async def Encode(
        self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vision_pb2.EncodeResponse]:
        runtime = await self._require_runtime(context)
        batcher = self._batcher
        assert batcher is not None
        started = time.monotonic()
        try:
            wire_dtype = self._wire_dtype(request.dtype, runtime)
            if batcher.queued_tiles >= batcher.max_queued_tiles:  # don't spend CPU decoding doomed work
                raise Overloaded(f"encoder queue is full ({batcher.queued_tiles} tiles queued); retry later")
            items, pixel_values = await self._preprocess(request, runtime)
            features = await batcher.submit(pixel_values)
        except (InvalidInput, TooLarge) as exc:
            raise_later = _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Overloaded as exc:
            raise_later = _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), (("retry-after-ms", RETRY_AFTER_MS),))
        except BatcherClosed as exc:
            raise_later = _Abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except Exception:
            log.exception("Encode failed")
            raise_later = _Abort(grpc.StatusCode.INTERNAL, "the encoder failed on this request; see its logs")
        else:
            raise_later = None
        if raise_later is not None:
            # Outside the except blocks: context.abort raises, and must not be caught above.
            await context.abort(raise_later.code, raise_later.message,
                                trailing_metadata=raise_later.trailing_metadata)

        offset = 0
        for index, item in enumerate(items):
            n = item.num_tiles
            header, data = await asyncio.to_thread(tensor_to_wire, features[offset : offset + n], wire_dtype)
            offset += n
            yield vision_pb2.EncodeResponse(
                header=vision_pb2.EmbeddingHeader(
                    index=index, num_tiles=n, tensor=header, frame_index=item.frame_index
                )
            )
            for chunk in iter_chunks(data, self.config.chunk_bytes):
                yield vision_pb2.EncodeResponse(chunk=chunk)
        log.debug(
            "encoded %d item(s), %d tiles in %.1f ms", len(items), offset, (time.monotonic() - started) * 1e3
        )

    async def _require_runtime(self, context: grpc.aio.ServicerContext) -> ModelRuntime:
        if self._runtime is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry when health is SERVING"
            )
        return self._runtime

    @staticmethod
    def _wire_dtype(requested: int, runtime: ModelRuntime) -> int:
        if requested == tensor_pb2.DTYPE_UNSPECIFIED:
            return runtime.wire_dtype
        if requested not in ITEMSIZE:
            names = ", ".join(tensor_pb2.DType.Name(d) for d in ITEMSIZE)
            raise InvalidInput(
                f"dtype {requested} is not supported; use DTYPE_UNSPECIFIED (the compute dtype), {names}"
            )
        return requested

    # ---- preprocessing (in the thread pool) --------------------------------------------------

    async def _preprocess(
        self, request: vision_pb2.EncodeRequest, runtime: ModelRuntime
    ) -> tuple[list[_Item], torch.Tensor]:
        """Decoded items and all their tiles as one tensor (float32 pixel values are large: a 13-tile
        image is 31 MB, so the concatenation also stays off the event loop)."""
        async with self._preprocess_slots:
            items = await self._decode(request, runtime)
            if len(items) == 1:
                return items, items[0].pixel_values
            loop = asyncio.get_running_loop()
            return items, await loop.run_in_executor(self._pool, torch.cat, [i.pixel_values for i in items])

    async def _decode(self, request: vision_pb2.EncodeRequest, runtime: ModelRuntime) -> list[_Item]:
        loop = asyncio.get_running_loop()
        kind = request.WhichOneof("input")
        cfg = self.config
        if kind == "images":
            images = request.images.images
            if not images:
                raise InvalidInput("images is empty; send at least one image")
            if len(images) > cfg.max_images_per_request:
                raise InvalidInput(
                    f"{len(images)} images in one request; the limit is {cfg.max_images_per_request}, "
                    "split them over several requests"
                )
            tiling = self._tiling(request.tiling, runtime.model_config, video=False)
            sizes = await loop.run_in_executor(self._pool, _declared_sizes, [image.data for image in images])
            tiles = sum(known_tiles(size, _limits_tiling(tiling), tiling.image_size) for size in sizes)
            if tiles > cfg.max_request_tiles:
                raise InvalidInput(
                    f"{len(images)} image(s) would be {tiles} tiles, over the encoder's limit of "
                    f"{cfg.max_request_tiles} tiles per request: send fewer images or a smaller tiling.max_tiles"
                )
            jobs = [
                loop.run_in_executor(
                    self._pool, _decode_image, image.data, i, tiling, cfg.max_pixels_per_image
                )
                for i, image in enumerate(images)
            ]
            return [_Item(pv) for pv in await asyncio.gather(*jobs)]
        if kind == "video":
            video = request.video
            if not video.data:
                raise InvalidInput("video.data is empty; send the encoded video file bytes (e.g. MP4)")
            segments = video.num_segments or cfg.default_video_segments
            if not 1 <= segments <= cfg.max_video_segments:
                raise InvalidInput(
                    f"video.num_segments must be 0 (default {cfg.default_video_segments}) or in "
                    f"[1, {cfg.max_video_segments}], got {video.num_segments}"
                )
            bound = _video_bound(video)
            tiling = self._tiling(request.tiling, runtime.model_config, video=True)
            budget = TileBudget(cfg.max_request_tiles, functools.partial(
                _frame_tiles, _limits_tiling(tiling), tiling.image_size))
            return await loop.run_in_executor(
                self._pool, _decode_video, video.data, bound, segments, tiling, cfg.max_pixels_per_image, budget
            )
        raise InvalidInput("the request has no input; set images (with at least one image) or video")

    @staticmethod
    def _tiling(opts: vision_pb2.TilingOptions, mc: InternVLConfig, *, video: bool) -> TilingConfig:
        try:
            tiling = resolve_tiling(
                opts.max_tiles, opts.min_tiles, opts.use_thumbnail if opts.HasField("use_thumbnail") else None,
                default_max_tiles=DEFAULT_VIDEO_MAX_TILES if video else mc.max_dynamic_patch,
                default_use_thumbnail=mc.use_thumbnail,
            )
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        return TilingConfig(image_size=mc.image_size, min_num=tiling.min_tiles, max_num=tiling.max_tiles,
                            use_thumbnail=tiling.use_thumbnail)


def _video_bound(video: vision_pb2.VideoInput) -> tuple[float, float] | None:
    has_start, has_end = video.HasField("start_seconds"), video.HasField("end_seconds")
    if not (has_start or has_end):
        return None
    start = video.start_seconds if has_start else _OPEN_START
    end = video.end_seconds if has_end else _OPEN_END
    if not (math.isfinite(start) and math.isfinite(end)) or start > end:
        raise InvalidInput(
            f"video bounds must be finite with start_seconds <= end_seconds, got [{start}, {end}]"
        )
    return start, end


def _limits_tiling(tiling: TilingConfig) -> Tiling:
    return Tiling(max_tiles=tiling.max_num, min_tiles=tiling.min_num, use_thumbnail=tiling.use_thumbnail)


def _frame_tiles(tiling: Tiling, image_size: int, width: int, height: int) -> int:
    return tile_count(width, height, tiling, image_size)


def _declared_sizes(images: list[bytes]) -> list[tuple[int, int] | None]:
    """Each image's size as its header declares it (nothing decoded); None where it cannot be read
    (`_decode_image` then says what is wrong)."""
    sizes: list[tuple[int, int] | None] = []
    for data in images:
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                sizes.append(image.size)
        except Exception:  # noqa: BLE001 - any unreadable header is reported by the decode itself
            sizes.append(None)
    return sizes


def _decode_image(data: bytes, index: int, tiling: TilingConfig, max_pixels: int) -> torch.Tensor:
    what = f"images[{index}]"
    if not data:
        raise InvalidInput(f"{what}.data is empty; send the encoded image file bytes ({IMAGE_FORMAT_NAMES})")
    try:
        # Image.open reads only the header: size limits are enforced before anything is decoded.
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            problem = check_image_size(*image.size, max_pixels, what)
            if problem is not None:
                raise InvalidInput(problem)
            rgb = open_image(image)  # the decode (first frame only); same conversion as upstream load_image
    except InvalidInput:
        raise
    except UnidentifiedImageError as exc:
        raise InvalidInput(
            f"{what} could not be decoded: it is not a {IMAGE_FORMAT_NAMES} image, or its header is damaged"
        ) from exc
    except Image.DecompressionBombError as exc:  # Pillow's own cap, hit at open for gigantic headers
        raise InvalidInput(f"{what} is over the limit of {max_pixels} pixels ({exc}); downscale it") from exc
    except Exception as exc:  # Pillow raises many types on hostile input (OSError, SyntaxError, ...)
        raise InvalidInput(
            f"{what} could not be decoded ({type(exc).__name__}: {exc}); the file is truncated or corrupt"
        ) from exc
    return tiles_to_pixel_values(dynamic_preprocess(rgb, **asdict(tiling)))


def _decode_video(
    data: bytes, bound: tuple[float, float] | None, segments: int, tiling: TilingConfig, max_pixels: int,
    budget: TileBudget,
) -> list[_Item]:
    try:
        indices, frames = read_video_frames(data, bound=bound, num_segments=segments, max_pixels=max_pixels,
                                            budget=budget)
    except FrameTooLarge as exc:
        raise InvalidInput(str(exc)) from exc
    except ValueError as exc:
        raise InvalidInput(
            f"video rejected: {exc} (send an MP4/H.264 or another format ffmpeg reads; bounds are seconds)"
        ) from exc
    return [
        _Item(tiles_to_pixel_values(dynamic_preprocess(frame, **asdict(tiling))), frame_index=int(idx))
        for idx, frame in zip(indices, frames, strict=True)
    ]
