"""Vision-encoder process settings: the one place flags and `IVL_ENCODER_*` env vars are read.

Every flag `--some-flag` defaults to the env var `IVL_ENCODER_SOME_FLAG` (the model also falls back
to `IVL_MODEL`, shared with the decoder), so containers configure by env and humans by flags.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.common.engine_health import EngineHealthConfig, add_engine_health_flags, engine_health_problems
from services.common.flags import EnvFlags, add_serving_flags, server_tls, serving_problems
from services.common.limits import DEFAULT_VIDEO_SEGMENTS, MAX_VIDEO_SEGMENTS
from services.common.server import MiB, ServerConfig
from services.common.wire import DEFAULT_CHUNK_BYTES

ENV_PREFIX = "IVL_ENCODER_"
DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9102
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
# Headroom for the EncodeResponse envelope around one chunk of bytes.
_CHUNK_ENVELOPE_BYTES = 1024


class ConfigError(ValueError):
    """A flag or env value is out of range; the message names the flag."""


@dataclass(frozen=True)
class EncoderConfig:
    model: str  # checkpoint directory or Hub repo id (OpenGVLab/InternVL2-8B)
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # auto = bf16 on accelerators, fp32 on CPU
    host: str = "127.0.0.1"  # beyond loopback only with mutual TLS (flags.peer_trust_problems)
    port: int = DEFAULT_PORT
    # Tiles per forward pass. One InternVL2-8B tile is 1025 ViT tokens; 32 tiles keep activations
    # well under a GiB in bf16 while filling an H100.
    max_batch_tiles: int = 32
    # How long the first waiting tile may wait for others to join its batch.
    batch_wait_ms: float = 5.0
    # Tiles admitted but not yet computed; beyond this, requests get RESOURCE_EXHAUSTED.
    max_queued_tiles: int = 256
    max_images_per_request: int = 16
    # Checked from the image header before decoding (decompression bombs). 8K x 5K.
    max_pixels_per_image: int = 40_000_000
    max_video_segments: int = MAX_VIDEO_SEGMENTS
    default_video_segments: int = DEFAULT_VIDEO_SEGMENTS
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_request_bytes: int = 64 * MiB
    grace_seconds: float = 30.0
    engine_max_failures: int = EngineHealthConfig.max_failures
    engine_recovery_timeout: float = EngineHealthConfig.recovery_timeout_s
    test_fault_file: str = ""  # test-only (hidden flag): every model call fails while this file exists
    preprocess_threads: int = 4
    torch_threads: int = 0  # 0 = torch's default
    log_level: str = "INFO"
    log_format: str = "text"  # text | json
    metrics_port: int = DEFAULT_METRICS_PORT  # 0 = no metrics endpoint
    metrics_host: str = ""  # "" = --host
    tls_cert: str = ""  # with tls_key: serve TLS
    tls_key: str = ""
    tls_ca: str = ""  # require client certificates signed by this CA (mutual TLS)
    health_port: int = 0  # plaintext health-only port for probes (0 = off)
    allow_unauthenticated_peers: bool = False  # a non-loopback host without mutual TLS (see flags.py)

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (bool(self.model), "--model is required (a checkpoint directory or a Hub repo id)"),
            (self.dtype in DTYPE_CHOICES, f"--dtype must be one of {', '.join(DTYPE_CHOICES)}"),
            (0 <= self.port <= 65535, "--port must be in [0, 65535]"),
            (self.max_batch_tiles >= 1, "--max-batch-tiles must be >= 1"),
            (self.batch_wait_ms >= 0, "--batch-wait-ms must be >= 0"),
            (
                self.max_queued_tiles >= self.max_batch_tiles,
                "--max-queued-tiles must be >= --max-batch-tiles",
            ),
            (self.max_images_per_request >= 1, "--max-images-per-request must be >= 1"),
            (self.max_pixels_per_image >= 1, "--max-pixels-per-image must be >= 1"),
            (
                1 <= self.default_video_segments <= self.max_video_segments,
                "--default-video-segments must be in [1, --max-video-segments]",
            ),
            (
                1 <= self.chunk_bytes <= self.max_send_bytes - _CHUNK_ENVELOPE_BYTES,
                f"--chunk-bytes must be in [1, {self.max_send_bytes - _CHUNK_ENVELOPE_BYTES}]",
            ),
            (self.max_request_bytes >= 1, "--max-request-bytes must be >= 1"),
            (self.grace_seconds >= 0, "--grace-seconds must be >= 0"),
            (self.preprocess_threads >= 1, "--preprocess-threads must be >= 1"),
            (self.torch_threads >= 0, "--torch-threads must be >= 0"),
        ]
        errors = [msg for ok, msg in checks if not ok] + serving_problems(self) + engine_health_problems(
            self.engine_max_failures, self.engine_recovery_timeout)
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def max_request_tiles(self) -> int:
        """The most tiles one request may become: the batcher admits no more at once (TooLarge)."""
        return self.max_queued_tiles

    @property
    def max_send_bytes(self) -> int:
        # Responses are chunked, so the send limit only needs to fit one chunk; keep gRPC's default floor.
        return max(16 * MiB, 2 * DEFAULT_CHUNK_BYTES)

    def engine_health_config(self) -> EngineHealthConfig:
        return EngineHealthConfig(self.engine_max_failures, self.engine_recovery_timeout, self.test_fault_file)

    def server_config(self) -> ServerConfig:
        return ServerConfig(
            host=self.host,
            port=self.port,
            max_receive_message_bytes=self.max_request_bytes,
            max_send_message_bytes=self.max_send_bytes,
            grace_seconds=self.grace_seconds,
            tls=server_tls(self),
            metrics_port=self.metrics_port,
            metrics_host=self.metrics_host,
            health_port=self.health_port,
        )

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> EncoderConfig:
        env = os.environ if env is None else env
        parser = argparse.ArgumentParser(
            prog="python -m services.vision_encoder",
            description="InternVL2 vision-encoder gRPC service. Every flag defaults to IVL_ENCODER_<FLAG>.",
        )
        flags = EnvFlags(parser, ENV_PREFIX, cls.__dataclass_fields__, env)
        add = flags.add
        model_default = env.get(ENV_PREFIX + "MODEL") or env.get("IVL_MODEL") or ""
        parser.add_argument(
            "--model",
            default=model_default,
            help="checkpoint directory or Hub repo id (env IVL_ENCODER_MODEL or IVL_MODEL)",
        )
        add("--device", str, "torch device: auto, cpu, cuda, cuda:1, ...")
        add("--dtype", str, "compute dtype", choices=DTYPE_CHOICES)
        add("--host", str, "bind address (0.0.0.0 or :: to serve beyond this machine)")
        add("--port", int, "gRPC port")
        add("--max-batch-tiles", int, "tiles per forward pass")
        add("--batch-wait-ms", float, "max wait for more tiles once one is queued")
        add("--max-queued-tiles", int, "admitted tiles beyond which requests get RESOURCE_EXHAUSTED")
        add("--max-images-per-request", int, "images accepted in one Encode request")
        add("--max-pixels-per-image", int, "width*height cap per image or frame, checked before decoding")
        add("--max-video-segments", int, "largest num_segments a video request may ask for")
        add("--default-video-segments", int, "frames sampled from a video when num_segments is 0")
        add("--chunk-bytes", int, "largest bytes chunk in an Encode response")
        add("--max-request-bytes", int, "largest Encode request accepted")
        add("--grace-seconds", float, "time in-flight calls get to finish on SIGTERM")
        add("--preprocess-threads", int, "threads decoding and tiling images and videos")
        add("--torch-threads", int, "torch intra-op threads on CPU (0 = torch's default)")
        add_serving_flags(flags)
        add_engine_health_flags(flags)
        args = parser.parse_args(argv)
        try:
            return cls(**vars(args))
        except ConfigError as exc:
            parser.error(str(exc))
            raise  # unreachable: parser.error exits

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
