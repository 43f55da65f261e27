"""InternVL2 model configuration, read from the checkpoint's `config.json`.

Only the fields the serving code uses are kept; everything else in the upstream config
(generation defaults, auto_map, label maps) is ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    norm_type: str = "layer_norm"
    hidden_act: str = "gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class RopeScaling:
    """`llm_config.rope_scaling`; which fields matter depends on `type` (see models/rope.py).

    dynamic (NTK, InternLM2) and linear: `factor`. su / longrope / yarn (Phi-3): `short_factor` and
    `long_factor` (one per rotary frequency), switched at `original_max_position_embeddings` (top-level
    in Phi-3's config). llama3 (Llama 3.1): `factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`.
    """

    type: str
    factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RopeScaling:
        """Upstream's dict; the type is `type` (older configs) or `rope_type` (newer transformers)."""
        kind = raw.get("type", raw.get("rope_type"))
        if not kind:
            raise ValueError(f"rope_scaling {raw!r} names no type (`type` or `rope_type`)")
        fields = _fields(cls, raw, exclude={"type", "short_factor", "long_factor"})
        floats = {k: float(v) for k, v in fields.items() if k != "original_max_position_embeddings"}
        ints = {k: int(v) for k, v in fields.items() if k == "original_max_position_embeddings"}
        lists = {k: tuple(float(x) for x in raw[k]) for k in ("short_factor", "long_factor") if raw.get(k)}
        return cls(type=str(kind), **floats, **ints, **lists)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}
        return out


# `llm_config.model_type` of each language-model class (written into configs this project generates).
MODEL_TYPES = {
    "InternLM2ForCausalLM": "internlm2",
    "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3",
    "LlamaForCausalLM": "llama",
}


@dataclass(frozen=True)
class LLMConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    bias: bool = False  # InternLM2: every attention projection has a bias
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    # `llm_config.architectures[0]`: picks the model class (services/language_decoder/models).
    architecture: str = "InternLM2ForCausalLM"
    tie_word_embeddings: bool = False  # the output head is the token embedding (no lm_head tensor)
    attention_bias: bool = False  # Llama: q/k/v/o biases
    mlp_bias: bool = False  # Llama: gate/up/down biases
    original_max_position_embeddings: int | None = None  # Phi-3: where long-context RoPE factors start

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class InternVLConfig:
    vision: VisionConfig
    llm: LLMConfig
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    force_image_size: int = 448
    template: str = "internlm2-chat"
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def num_image_token(self) -> int:
        """Visual tokens per 448 px tile after pixel shuffle (256 for InternVL2)."""
        grid = self.image_size // self.vision.patch_size
        return int(grid * grid * self.downsample_ratio**2)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> InternVLConfig:
        return cls(
            vision=_pick(VisionConfig, raw["vision_config"]),
            llm=_llm_from_dict(raw["llm_config"]),
            **_fields(cls, raw, exclude={"vision", "llm"}),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> InternVLConfig:
        path = Path(model_dir) / "config.json"
        with path.open(encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` body in the upstream layout (used by the tiny-checkpoint writer)."""
        from dataclasses import asdict

        llm = asdict(self.llm)
        llm["rope_scaling"] = self.llm.rope_scaling.to_dict() if self.llm.rope_scaling else None
        if llm["original_max_position_embeddings"] is None:
            del llm["original_max_position_embeddings"]
        if self.llm.architecture != "LlamaForCausalLM":  # only Llama's config has these two
            del llm["attention_bias"], llm["mlp_bias"]
        llm.update(
            architectures=[llm.pop("architecture")],
            model_type=MODEL_TYPES.get(self.llm.architecture, ""),
            attn_implementation="flash_attention_2",
            torch_dtype="bfloat16",
        )
        vision = asdict(self.vision)
        vision.update(
            architectures=["InternVisionModel"],
            model_type="intern_vit_6b",
            use_flash_attn=True,
            drop_path_rate=0.0,
            torch_dtype="bfloat16",
        )
        top = {k: v for k, v in asdict(self).items() if k not in ("vision", "llm")}
        return {
            "architectures": ["InternVLChatModel"],
            "model_type": "internvl_chat",
            "torch_dtype": "bfloat16",
            "pad2square": False,
            "use_backbone_lora": 0,
            "use_llm_lora": 0,
            **top,
            "llm_config": llm,
            "vision_config": vision,
        }


def _fields(cls: type, raw: dict[str, Any], exclude: set[str] = frozenset()) -> dict[str, Any]:
    names = {f for f in cls.__dataclass_fields__ if f not in exclude}
    return {k: raw[k] for k in names if k in raw and raw[k] is not None}


def _pick(cls: type, raw: dict[str, Any]):
    return cls(**_fields(cls, raw))


def _llm_from_dict(raw: dict[str, Any]) -> LLMConfig:
    scaling = raw.get("rope_scaling")
    rope = RopeScaling.from_dict(scaling) if scaling else None
    fields = _fields(LLMConfig, raw, exclude={"rope_scaling", "architecture"})
    architectures = raw.get("architectures") or [LLMConfig.architecture]
    if len(architectures) != 1:
        raise ValueError(f"llm_config.architectures must name one model class, got {architectures!r}")
    return LLMConfig(rope_scaling=rope, architecture=str(architectures[0]), **fields)
