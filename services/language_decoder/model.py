"""The decoder's model layer under its historical import path (the code lives in `models/`).

`load_language_model` / `build_language_model` pick the architecture from `llm_config.architectures`
(see `services/language_decoder/models/__init__.py`); the InternLM2 names are kept for callers that
build InternLM2 directly (tests, benchmarks).
"""

from __future__ import annotations

from services.language_decoder.models import (
    ARCHITECTURES,
    CausalLM,
    InternLM2ForCausalLM,
    build_language_model,
    checkpoint_shapes,
    compile_layers,
    language_model_class,
    load_language_model,
)
from services.language_decoder.models.internlm2 import Attention, FeedForward, InternLM2Model, split_wqkv
from services.language_decoder.models.layers import (
    AttentionContext,
    KVCache,
    KVStore,
    RMSNorm,
    apply_rotary,
    attention,
    build_attention_mask,
    kv_attend,
    position_ids_from_mask,
    rotate_half,
)
from services.language_decoder.models.rope import RotaryEmbedding

__all__ = [
    "ARCHITECTURES", "Attention", "AttentionContext", "CausalLM", "FeedForward", "InternLM2ForCausalLM",
    "InternLM2Model", "KVCache", "KVStore", "RMSNorm", "RotaryEmbedding", "apply_rotary", "attention",
    "build_attention_mask", "build_language_model", "checkpoint_shapes", "compile_layers", "kv_attend",
    "language_model_class", "load_language_model", "position_ids_from_mask", "rotate_half", "split_wqkv",
]
