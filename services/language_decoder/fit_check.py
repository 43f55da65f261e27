"""The decoder's start-up fit check: refuse, before any weight is read, a model its device cannot hold.

What it counts (rules in services/common/fit.py): the weights as this start will hold them (`--dtype`,
`--quantize`), the smallest KV cache the engine accepts (`--num-kv-blocks` when given; else on a GPU one
`--max-model-len` sequence, on CPU the `--cpu-kv-cache-mib` it allocates), the engine's activation reserve
on a GPU, and on CPU in fp32 the engine's prepacked copy of the linear weights.
"""

from __future__ import annotations

from pathlib import PurePath

import torch

from services.common.fit import (
    DTYPE_BYTES,
    DeviceMemory,
    Need,
    check_fits,
    decoder_need,
    gib,
    kv_bytes_per_token,
)
from services.common.model_config import InternVLConfig
from services.common.quantization import INT8, NO_QUANTIZATION
from services.common.tensors import TORCH_TO_WIRE
from services.common.wire import DTYPE_NAMES
from services.language_decoder.config import DecoderConfig
from services.language_decoder.engine import EngineConfig
from services.language_decoder.footprint import language_weights


def kv_tokens_at_start(config: DecoderConfig, model_config: InternVLConfig, device: str, dtype: str) -> int:
    """Token slots of the smallest KV cache this start can run with (the engine sizes it in blocks)."""
    block = config.block_size
    if config.num_kv_blocks:
        return config.num_kv_blocks * block
    if torch.device(device).type == "cuda":
        return -(-config.max_model_len // block) * block  # one longest sequence: the engine's minimum
    per_block = block * kv_bytes_per_token(model_config.llm, DTYPE_BYTES[dtype])
    return (config.cpu_kv_cache_mib << 20) // per_block * block


def decoder_start_need(config: DecoderConfig, model_config: InternVLConfig, device: str, dtype: torch.dtype,
                       quantize: str) -> Need:
    name = DTYPE_NAMES[TORCH_TO_WIRE[dtype]]
    weights = language_weights(model_config.llm)
    on_gpu = torch.device(device).type == "cuda"
    extra = ()
    if not on_gpu and name == "fp32" and not config.no_cpu_prepacked_weights:
        extra = (("prepacked copy of the linear weights", weights.cpu_prepacked_copy_bytes(quantize)),)
    return decoder_need(
        f"{PurePath(config.model.rstrip('/')).name} language model", weights, model_config.llm, name, quantize,
        kv_tokens_at_start(config, model_config, device, name),
        EngineConfig.gpu_activation_reserve_bytes if on_gpu else 0, extra,
    )


def check_decoder_fits(config: DecoderConfig, model_config: InternVLConfig, device: str, dtype: torch.dtype,
                       memory: DeviceMemory | None) -> Need:
    """Raise `ModelDoesNotFit` (services/common/fit.py) with what to do when the model cannot fit `memory`."""
    need = decoder_start_need(config, model_config, device, dtype, config.quantize)
    if memory is None or need.fits(memory):
        return need
    dtype_name = DTYPE_NAMES[TORCH_TO_WIRE[dtype]]
    on_cpu = torch.device(device).type == "cpu"
    advice = []
    if config.quantize == NO_QUANTIZATION:
        int8 = decoder_start_need(config, model_config, device, dtype, INT8)
        verdict = "which fits" if int8.fits(memory) else "still too much"
        advice.append(f"--quantize int8 (int8 decoder-block weights: {gib(int8.total)} in all, {verdict})")
    if dtype_name == "fp32":
        advice.append("--dtype bf16 (half the bytes of fp32)")
    if on_cpu and dtype_name == "fp32" and not config.no_cpu_prepacked_weights:
        advice.append("--no-cpu-prepacked-weights (no second fp32 copy of the weights)")
    if on_cpu:
        advice.append(f"a machine with {gib(need.total)} of free RAM, or a GPU")
    else:
        advice.append(f"a GPU with {gib(need.total)} usable (see --gpu-memory-utilization)")
    kv_flags = "--cpu-kv-cache-mib or --num-kv-blocks" if on_cpu else "--max-model-len or --num-kv-blocks"
    per_token = kv_bytes_per_token(model_config.llm, DTYPE_BYTES[dtype_name])
    advice.append(f"a smaller {kv_flags} (the KV cache takes {per_token} bytes per token)")
    check_fits(need, memory, advice,
               "Splitting one language model across several GPUs (tensor parallelism) is not supported yet.")
    return need
