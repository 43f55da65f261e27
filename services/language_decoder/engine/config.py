"""Engine configuration: one frozen dataclass, validated once, read everywhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.quantization import NO_QUANTIZATION, check_quantize


@dataclass(frozen=True)
class EngineConfig:
    """Sizes and limits of one decoder engine.

    KV cache size, in order of precedence: `num_kv_blocks`; else `kv_cache_memory_bytes`; else, on a
    GPU, `gpu_memory_utilization` of the device memory left free after the weights are loaded (minus
    room for activations); on CPU, `cpu_kv_cache_bytes`.
    """

    block_size: int = 16  # tokens per KV block (flash-attn's paged kernels want a multiple of 256)
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    gpu_activation_reserve_bytes: int = 3 << 30  # left free for step activations and CUDA graphs
    cpu_kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64  # sequences in the running batch
    max_num_batched_tokens: int = 2048  # tokens per step: all decodes + prefill chunks (chunked prefill)
    max_model_len: int = 8192  # prompt + generated tokens; InternVL2-8B was trained and served at 8k
    max_queue_size: int = 256  # requests waiting for admission; more -> QueueFull (RESOURCE_EXHAUSTED)
    enable_prefix_caching: bool = True
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: the model's dtype
    # GPU decode steps replayed from CUDA graphs (ignored on CPU). Needs a decode RoPE table (no
    # dynamic-NTK rescaling within max_model_len); the runner checks.
    use_cuda_graphs: bool = True
    # torch.compile each decoder layer (Inductor fuses the norms, RoPE, residuals and SiLU into a few
    # kernels; the KV store stays eager). None = on CUDA only: the first steps of new shapes compile
    # (about 15 s for InternVL2-8B on an H100; `LLMEngine.warm_up`); CPU, the test path, stays eager.
    compile_layers: bool | None = None
    compile_mode: str = "default"  # torch.compile mode; "max-autotune-no-cudagraphs" also tunes the matmuls
    watermark_blocks: int = 0  # free blocks kept back at admission so running decodes rarely preempt
    # CPU, fp32: keep a second, oneDNN-prepacked copy of every weight for batched decode matmuls
    # (10-30 % faster at 4-64 sequences; doubles weight memory). See cpu_weights.PrepackedLinear.
    cpu_prepacked_weights: bool = True
    # "int8": the decoder blocks' linear weights as int8 with per-channel scales (quantize.py), applied to
    # the model in place before the runner sees it; a model loaded with quantize="int8" already is.
    # "none" leaves the model as given.
    quantize: str = NO_QUANTIZATION

    def __post_init__(self) -> None:
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_queue_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("EngineConfig.num_kv_blocks must be >= 1")
        # Every running sequence decodes every step, so one step must fit all their decode tokens.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): each step carries one decode token per running sequence"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.watermark_blocks < 0:
            raise ValueError("watermark_blocks must be >= 0")
        check_quantize(self.quantize)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)
