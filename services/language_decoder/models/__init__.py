"""The language models of the InternVL2 family, chosen by `llm_config.architectures`.

| architecture | members | module |
|---|---|---|
| InternLM2ForCausalLM | 2B, 8B, 26B | `internlm2.py` |
| Qwen2ForCausalLM | 1B | `llama.py` (q/k/v biases) |
| Phi3ForCausalLM | 4B | `llama.py` (fused qkv / gate_up split at load, long-context RoPE) |
| LlamaForCausalLM | 40B, Llama3-76B | `llama.py` |

Entry points: `build_language_model(cfg, device=None, dtype=None)` builds the module tree (on the meta
device by default: no memory; `device`/`dtype` give real, uninitialised tensors), `load_language_model`
builds on meta and assigns the checkpoint's `language_model.*` tensors, `checkpoint_shapes(cfg)` lists
the tensors a checkpoint must hold for `cfg` (names below `language_model.` and shapes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.common.checkpoint import LLM_PREFIXES, assign_weights, default_dtype, load_tensors, resolve_model_dir
from services.common.model_config import InternVLConfig, LLMConfig
from services.common.quantization import INT8, NO_QUANTIZATION, check_quantize
from services.language_decoder.quantize import int8_loader

from .base import CausalLM, compile_layers
from .internlm2 import InternLM2ForCausalLM
from .llama import LlamaForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
}

__all__ = [
    "ARCHITECTURES", "CausalLM", "InternLM2ForCausalLM", "LlamaForCausalLM", "Phi3ForCausalLM",
    "Qwen2ForCausalLM", "build_language_model", "checkpoint_shapes", "compile_layers", "language_model_class",
    "load_language_model",
]


def language_model_class(cfg: LLMConfig) -> type[CausalLM]:
    """The model class for `cfg.architecture`; a clear error for any other."""
    try:
        return ARCHITECTURES[cfg.architecture]
    except KeyError:
        raise ValueError(
            f"llm_config.architectures names {cfg.architecture!r}, which this decoder does not implement; "
            f"supported: {', '.join(ARCHITECTURES)}"
        ) from None


def build_language_model(
    cfg: LLMConfig, device: torch.device | str = "meta", dtype: torch.dtype | None = None
) -> CausalLM:
    """The module tree for `cfg` on `device` (default meta: shapes only, no memory; on a real device
    the weights are uninitialised), in `dtype` if given (RoPE frequencies stay float32)."""
    cls = language_model_class(cfg)
    with torch.device(device):
        model = cls(cfg)
    if dtype is not None:
        model = model.to(dtype)
        model.rotary.init_buffers(device)
    return model


def checkpoint_shapes(cfg: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Name (below `language_model.`) -> shape of every tensor a checkpoint for `cfg` must hold."""
    return build_language_model(cfg, device="meta").checkpoint_shapes()


def load_language_model(
    model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    quantize: str = NO_QUANTIZATION,
) -> CausalLM:
    """Build on meta and assign the `language_model.*` tensors; vision tensors are never read.

    Each tensor is mapped to the model's own names as it is read (Phi-3's fused projections are split
    there); `quantize="int8"`: the decoder blocks' linear weights then become int8 (see quantize.py).
    """
    model_dir = resolve_model_dir(model_dir)
    cfg = InternVLConfig.from_dir(model_dir).llm
    dtype = dtype or default_dtype(device)
    model = build_language_model(cfg, device="meta")
    cast = int8_loader(model, dtype) if check_quantize(quantize) == INT8 else None

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, part in model.from_checkpoint(name, tensor).items():
            out.update(cast(key, part) if cast is not None else {key: part.to(dtype)})
        return out

    tensors = load_tensors(
        model_dir, LLM_PREFIXES, dtype=dtype, device=device, strip="language_model.", progress=False,
        convert=convert,
    )
    if cast is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the quantiser's fp32 temporaries: free before the KV cache is sized
    assign_weights(model, tensors, "language model")
    # Non-persistent buffers are not in the checkpoint: create them on the real device, in fp32.
    model.rotary.init_buffers(device)
    return model.eval()
