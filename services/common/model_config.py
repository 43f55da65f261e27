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
    type: str  # "dynamic" (NTK) or "linear"
    factor: float


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
    bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2

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
        llm["rope_scaling"] = asdict(self.llm.rope_scaling) if self.llm.rope_scaling else None
        llm.update(
            architectures=["InternLM2ForCausalLM"],
            model_type="internlm2",
            attn_implementation="flash_attention_2",
            tie_word_embeddings=False,
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
    rope = RopeScaling(type=scaling["type"], factor=float(scaling["factor"])) if scaling else None
    fields = _fields(LLMConfig, raw, exclude={"rope_scaling"})
    return LLMConfig(rope_scaling=rope, **fields)
