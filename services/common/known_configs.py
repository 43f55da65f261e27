"""Configurations of published InternVL2 checkpoints, for tests and tools that must not download them.

Values are the ones listed under "Real InternVL2-8B facts" in `tests/fixtures/parity/README.md`
(the upstream `config.json` of `OpenGVLab/InternVL2-8B`: InternViT-300M-448px + MLP projector +
internlm2_5-7b-chat).
"""

from __future__ import annotations

from .model_config import InternVLConfig, LLMConfig, RopeScaling, VisionConfig


def internvl2_8b_config() -> InternVLConfig:
    """The architecture of `OpenGVLab/InternVL2-8B` (about 8.08B parameters)."""
    return InternVLConfig(
        vision=VisionConfig(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            image_size=448,
            patch_size=14,
            num_channels=3,
            layer_norm_eps=1e-6,
            qkv_bias=True,
            qk_normalization=False,
            norm_type="layer_norm",
            hidden_act="gelu",
        ),
        llm=LLMConfig(
            vocab_size=92553,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            rope_scaling=RopeScaling(type="dynamic", factor=2.0),
            max_position_embeddings=32768,
            bias=False,
            hidden_act="silu",
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        ),
        downsample_ratio=0.5,
        ps_version="v2",
        select_layer=-1,
        force_image_size=448,
        template="internlm2-chat",
        dynamic_image_size=True,
        use_thumbnail=True,
        min_dynamic_patch=1,
        max_dynamic_patch=12,
    )
