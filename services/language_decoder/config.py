"""Language-decoder process settings: the one place flags and `IVL_DECODER_*` env vars are read."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.common.engine_health import EngineHealthConfig, add_engine_health_flags, engine_health_problems
from services.common.flags import EnvFlags, add_serving_flags, server_tls, serving_problems
from services.common.quantization import NO_QUANTIZATION, QUANTIZE_CHOICES
from services.common.server import MiB, ServerConfig

ENV_PREFIX = "IVL_DECODER_"
DEFAULT_PORT = 50053
DEFAULT_METRICS_PORT = 9103
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
AUTO_ON_OFF = ("auto", "on", "off")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class DecoderConfig:
    model: str  # checkpoint directory or Hub repo id
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # auto = bf16 on accelerators, fp32 on CPU
    quantize: str = NO_QUANTIZATION  # int8: decoder-block weights int8 (half of bf16's bytes), weight-only
    host: str = "127.0.0.1"  # beyond loopback only with mutual TLS (flags.peer_trust_problems)
    port: int = DEFAULT_PORT
    max_model_len: int = 8192  # InternVL2-8B's training context
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_queue_size: int = 256
    block_size: int = 16
    num_kv_blocks: int = 0  # 0 = size the cache from memory (GPU: free memory; CPU: --cpu-kv-cache-mib)
    cpu_kv_cache_mib: int = 1024
    gpu_memory_utilization: float = 0.9
    compile_layers: str = "auto"  # torch.compile the decoder layers: auto (= on CUDA), on, off
    compile_mode: str = "default"  # torch.compile mode; max-autotune-no-cudagraphs: +7% decode, slow start
    no_cuda_graphs: bool = False  # GPU decode steps launched kernel by kernel (debugging)
    no_cpu_prepacked_weights: bool = False  # CPU fp32: no second, oneDNN-prepacked copy of the weights
    warmup: str = "auto"  # throwaway requests before SERVING (compiles, captures graphs): auto (= on CUDA)
    default_max_new_tokens: int = 1024
    max_images_per_request: int = 64
    max_image_tiles: int = 1024  # all images of one request together
    grace_seconds: float = 30.0
    engine_max_failures: int = EngineHealthConfig.max_failures
    engine_recovery_timeout: float = EngineHealthConfig.recovery_timeout_s
    test_fault_file: str = ""  # test-only (hidden flag): every model call fails while this file exists
    torch_threads: int = 0
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
        errors = [
            msg
            for ok, msg in [
                (bool(self.model), "--model is required (a checkpoint directory or a Hub repo id)"),
                (self.dtype in DTYPE_CHOICES, f"--dtype must be one of {', '.join(DTYPE_CHOICES)}"),
                (self.quantize in QUANTIZE_CHOICES, f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}"),
                (0 <= self.port <= 65535, "--port must be in [0, 65535]"),
                (self.max_model_len >= 16, "--max-model-len must be >= 16"),
                (self.default_max_new_tokens >= 1, "--default-max-new-tokens must be >= 1"),
                (self.num_kv_blocks >= 0, "--num-kv-blocks must be >= 0"),
                (self.cpu_kv_cache_mib >= 1, "--cpu-kv-cache-mib must be >= 1"),
                (self.max_images_per_request >= 1, "--max-images-per-request must be >= 1"),
                (self.grace_seconds >= 0, "--grace-seconds must be >= 0"),
                (self.compile_layers in AUTO_ON_OFF, "--compile-layers must be auto, on or off"),
                (self.warmup in AUTO_ON_OFF, "--warmup must be auto, on or off"),
                (self.compile_mode in COMPILE_MODES, f"--compile-mode must be one of {', '.join(COMPILE_MODES)}"),
            ]
            if not ok
        ] + serving_problems(self) + engine_health_problems(
            self.engine_max_failures, self.engine_recovery_timeout)
        if errors:
            raise ValueError("; ".join(errors))

    def engine_health_config(self) -> EngineHealthConfig:
        return EngineHealthConfig(self.engine_max_failures, self.engine_recovery_timeout, self.test_fault_file)

    def server_config(self) -> ServerConfig:
        # Requests carry image embeddings in chunks of a few MiB; responses are small text deltas.
        return ServerConfig(host=self.host, port=self.port, max_receive_message_bytes=16 * MiB,
                            grace_seconds=self.grace_seconds, tls=server_tls(self),
                            metrics_port=self.metrics_port, metrics_host=self.metrics_host,
                            health_port=self.health_port)

    @staticmethod
    def _auto(value: str, device: str) -> bool:
        return value == "on" or (value == "auto" and device.startswith("cuda"))

    def resolved_compile_layers(self, device: str) -> bool:
        return self._auto(self.compile_layers, device)

    def resolved_warmup(self, device: str) -> bool:
        return self._auto(self.warmup, device)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> DecoderConfig:
        env = os.environ if env is None else env
        parser = argparse.ArgumentParser(
            prog="python -m services.language_decoder",
            description="InternVL2 language-decoder gRPC service. Every flag defaults to IVL_DECODER_<FLAG>.",
        )
        parser.add_argument("--model", default=env.get(ENV_PREFIX + "MODEL") or env.get("IVL_MODEL") or "",
                            help="checkpoint directory or Hub repo id (env IVL_DECODER_MODEL or IVL_MODEL)")
        flags = EnvFlags(parser, ENV_PREFIX, cls.__dataclass_fields__, env)
        flags.add("--device", str, "torch device: auto, cpu, cuda, cuda:1, ...")
        flags.add("--dtype", str, "compute dtype", choices=DTYPE_CHOICES)
        flags.add("--quantize", str, "int8: the decoder blocks' linear weights as int8 with per-channel scales, "
                  "quantised while loading (output close to, not identical with, unquantised)",
                  choices=QUANTIZE_CHOICES)
        flags.add("--host", str, "bind address (0.0.0.0 or :: to serve beyond this machine)")
        flags.add("--port", int, "gRPC port")
        flags.add("--max-model-len", int, "prompt + generated tokens per sequence")
        flags.add("--max-num-seqs", int, "sequences decoded together")
        flags.add("--max-num-batched-tokens", int, "tokens per engine step (chunked-prefill budget)")
        flags.add("--max-queue-size", int, "waiting requests beyond which calls get RESOURCE_EXHAUSTED")
        flags.add("--block-size", int, "tokens per KV-cache block")
        flags.add("--num-kv-blocks", int, "KV-cache blocks (0 = from memory)")
        flags.add("--cpu-kv-cache-mib", int, "KV-cache size on CPU when --num-kv-blocks is 0")
        flags.add("--gpu-memory-utilization", float, "fraction of GPU memory for weights + KV cache")
        flags.add("--compile-layers", str, "torch.compile the decoder layers (auto = on CUDA)", choices=AUTO_ON_OFF)
        flags.add("--compile-mode", str, "torch.compile mode of the layers", choices=COMPILE_MODES)
        flags.add_switch("--no-cuda-graphs", "launch GPU decode steps kernel by kernel (no CUDA graphs)")
        flags.add_switch("--no-cpu-prepacked-weights",
                         "CPU fp32: keep one copy of the weights (no oneDNN-prepacked copy; slower batches)")
        flags.add("--warmup", str, "run throwaway requests before serving (auto = on CUDA)", choices=AUTO_ON_OFF)
        flags.add("--default-max-new-tokens", int, "max_new_tokens when a request leaves it 0")
        flags.add("--max-images-per-request", int, "image blocks accepted in one request")
        flags.add("--max-image-tiles", int, "tiles accepted in one request, all images together")
        flags.add("--grace-seconds", float, "time in-flight calls get to finish on SIGTERM")
        flags.add("--torch-threads", int, "torch intra-op threads on CPU (0 = torch's default)")
        add_serving_flags(flags)
        add_engine_health_flags(flags)
        args = parser.parse_args(argv)
        try:
            return cls(**vars(args))
        except ValueError as exc:
            parser.error(str(exc))
            raise
