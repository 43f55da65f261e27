"""What a model needs in device memory, and the refusal to start when it cannot fit (pure, torch-free).

The services build their model on the meta device first (nothing allocated), count its weights
(`services/language_decoder/footprint.py`, `services/vision_encoder/footprint.py`), and compare the bytes
below with what the device has (`services/common/device_memory.py`) before reading a single weight: a
76B checkpoint on an 80 GB GPU fails in a second with a message saying what to do, not after minutes of
loading with an out-of-memory error.

The byte rules, each stated once here:

- weights: every parameter in the compute dtype, except under `--quantize int8`
  (`services/language_decoder/quantize.py`): the decoder blocks' linear weights are int8 (1 byte) plus
  one compute-dtype scale per output channel; embedding, LM head, norms and biases stay in the compute dtype;
- KV cache: K and V per token in every layer, `2 x layers x kv_heads x head_dim x dtype bytes`;
- room beside them: the decoder engine keeps `EngineConfig.gpu_activation_reserve_bytes` free on a GPU;
  the encoder needs one batch's activations (`encoder_activation_bytes`, an estimate).

On a GPU, a process may use `usable_bytes` of the card (what is free now, less the part of the card
`--gpu-memory-utilization` leaves to others), the engine's own rule for sizing its KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.model_config import LLMConfig, VisionConfig
from services.common.quantization import INT8, check_quantize

GiB = 1 << 30
INT8_BYTES = 1
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class ModelDoesNotFit(RuntimeError):
    """The model cannot fit the device; the message says what it needs, what there is, and what to do."""


@dataclass(frozen=True)
class LanguageWeights:
    """Element counts of a language model's weights, split by how `--quantize int8` stores them."""

    block_linear: int  # linear weights inside the decoder blocks: int8 under --quantize int8
    block_linear_rows: int  # their output channels: one scale each, in the compute dtype, under int8
    other_linear: int  # the other linear weights (the LM head): compute dtype always
    other: int  # embedding, norms, biases: compute dtype always

    @property
    def parameters(self) -> int:
        return self.block_linear + self.other_linear + self.other

    def bytes(self, dtype_bytes: int, quantize: str) -> int:
        if check_quantize(quantize) == INT8:
            kept = self.block_linear_rows + self.other_linear + self.other
            return self.block_linear * INT8_BYTES + kept * dtype_bytes
        return self.parameters * dtype_bytes

    def cpu_prepacked_copy_bytes(self, quantize: str) -> int:
        """The engine's second, oneDNN-prepacked fp32 copy of every plain linear weight (CPU, fp32 only)."""
        plain = self.other_linear + (0 if check_quantize(quantize) == INT8 else self.block_linear)
        return plain * DTYPE_BYTES["fp32"]


def kv_bytes_per_token(llm: LLMConfig, dtype_bytes: int) -> int:
    """K and V of one token in every layer (128 KiB for InternVL2-8B in bf16)."""
    return 2 * llm.num_hidden_layers * llm.num_key_value_heads * llm.head_dim * dtype_bytes


def encoder_activation_bytes(vision: VisionConfig, tiles: int, dtype_bytes: int) -> int:
    """An estimate of one encoder batch's activations: per ViT token of `tiles` tiles, the tensors alive
    inside one layer (residual, norm output, q/k/v, attention output: 6 x hidden; the MLP's hidden layer).
    Fused attention kernels keep no tokens x tokens matrix; the upstream-exact fp32 CPU path is not sized."""
    tokens = tiles * (vision.num_patches + 1)
    return tokens * (6 * vision.hidden_size + vision.intermediate_size) * dtype_bytes


def usable_bytes(free: int, total: int, utilization: float) -> int:
    """What one process may take of a GPU: the free memory, less the (1 - utilization) share of the card
    left for others (the decoder engine sizes its KV cache by the same rule)."""
    return free - round((1.0 - utilization) * total)


@dataclass(frozen=True)
class DeviceMemory:
    """What a device has for this process, in bytes; `source` says where the numbers come from."""

    device: str
    free: int
    total: int
    usable: int
    source: str  # e.g. "torch.cuda.mem_get_info, --gpu-memory-utilization 0.9" or "MemAvailable"


@dataclass(frozen=True)
class Need:
    """What one service needs on its device: labelled parts in bytes."""

    what: str  # "InternVL2-26B language model"
    parts: tuple[tuple[str, int], ...]  # (label, bytes)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    def fits(self, memory: DeviceMemory) -> bool:
        return self.total <= memory.usable


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def check_fits(need: Need, memory: DeviceMemory | None, advice: Sequence[str], note: str = "") -> None:
    """Raise `ModelDoesNotFit` when `need` exceeds what `memory` offers; None = a device not checked.

    `advice`: the ways out, most useful first; `note`: a last sentence (e.g. what is not supported yet).
    """
    if memory is None or need.fits(memory):
        return
    parts = " + ".join(f"{gib(n)} {label}" for label, n in need.parts)
    raise ModelDoesNotFit(
        f"{need.what} does not fit {memory.device}: it needs {gib(need.total)} ({parts}), the device has "
        f"{gib(memory.usable)} usable ({gib(memory.free)} free of {gib(memory.total)}; {memory.source}). "
        "To serve it: " + "; or ".join(advice) + "." + (f" {note}" if note else "")
    )


def decoder_need(what: str, language: LanguageWeights, llm: LLMConfig, dtype: str, quantize: str, kv_tokens: int,
                 reserve: int, extra: tuple[tuple[str, int], ...] = ()) -> Need:
    """The decoder: weights, the KV cache for `kv_tokens` tokens, `reserve` bytes of room, `extra` parts."""
    weights = f"weights ({dtype}, int8 decoder blocks)" if quantize == INT8 else f"weights ({dtype})"
    return Need(what, (
        (weights, language.bytes(DTYPE_BYTES[dtype], quantize)),
        (f"KV cache for {kv_tokens} tokens", kv_tokens * kv_bytes_per_token(llm, DTYPE_BYTES[dtype])),
        *([("activation reserve", reserve)] if reserve else []),
        *extra,
    ))


def encoder_need(what: str, vision_parameters: int, vision: VisionConfig, dtype: str, tiles: int) -> Need:
    """The encoder: weights (InternViT + mlp1) and one batch of `tiles` tiles' activations."""
    return Need(what, (
        (f"weights ({dtype})", vision_parameters * DTYPE_BYTES[dtype]),
        (f"activations of a {tiles}-tile batch", encoder_activation_bytes(vision, tiles, DTYPE_BYTES[dtype])),
    ))


@dataclass(frozen=True)
class MemberNeeds:
    """What an InternVL2 checkpoint needs (both services), from its config and meta-built weight counts.

    `dtype` arguments are compute dtype names (`DTYPE_BYTES`); the published weights are bf16.
    """

    name: str
    vision: VisionConfig
    vision_parameters: int  # InternViT + mlp1
    llm: LLMConfig
    language: LanguageWeights

    @property
    def parameters(self) -> int:
        return self.vision_parameters + self.language.parameters

    def vision_bytes(self, dtype: str = "bf16") -> int:
        return self.vision_parameters * DTYPE_BYTES[dtype]

    def language_bytes(self, quantize: str, dtype: str = "bf16") -> int:
        return self.language.bytes(DTYPE_BYTES[dtype], quantize)

    def kv_bytes_per_token(self, dtype: str = "bf16") -> int:
        return kv_bytes_per_token(self.llm, DTYPE_BYTES[dtype])

    def decoder_need(self, quantize: str, kv_tokens: int, reserve: int, dtype: str = "bf16") -> Need:
        return decoder_need(f"{self.name} language model", self.language, self.llm, dtype, quantize, kv_tokens,
                            reserve)

    def encoder_need(self, tiles: int, dtype: str = "bf16") -> Need:
        return encoder_need(f"{self.name} vision encoder", self.vision_parameters, self.vision, dtype, tiles)

    def one_gpu_need(self, quantize: str, kv_tokens: int, reserve: int, tiles: int) -> Need:
        """Both services on one GPU, in bf16: the encoder's need plus the decoder's."""
        encoder, decoder = self.encoder_need(tiles), self.decoder_need(quantize, kv_tokens, reserve)
        parts = tuple((f"vision {label}", n) for label, n in encoder.parts)
        parts += tuple((f"language model {label}", n) for label, n in decoder.parts)
        return Need(f"{self.name} (encoder and decoder on one GPU)", parts)
