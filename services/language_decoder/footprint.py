"""The language model's weight counts, from its config alone: built on the meta device (nothing allocated),
split by how `--quantize int8` stores them (`services/common/fit.py` turns them into bytes)."""

from __future__ import annotations

import torch
from torch import nn

from services.common.fit import LanguageWeights
from services.common.model_config import LLMConfig
from services.common.quantization import INT8
from services.language_decoder.model import build_language_model
from services.language_decoder.quantize import Int8Linear, quantize_model


def language_weights(cfg: LLMConfig) -> LanguageWeights:
    """Counts of the model `build_language_model(cfg)` builds; the int8 split is quantize.py's own rule
    (its `quantize_model` applied to the meta model), so it cannot drift from what a load holds."""
    with torch.device("meta"):
        model = build_language_model(cfg)
    total = sum(t.numel() for t in model.state_dict().values())
    # fp32 scales: no CPU-kernel probe; only the split matters here, not the dtype of the meta tensors.
    quantize_model(model, INT8, torch.float32)
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    plain = [m for m in model.modules() if isinstance(m, nn.Linear)]
    block_linear = sum(m.weight.numel() for m in int8)
    other_linear = sum(m.weight.numel() for m in plain)
    return LanguageWeights(
        block_linear=block_linear,
        block_linear_rows=sum(m.out_features for m in int8),
        other_linear=other_linear,
        other=total - block_linear - other_linear,
    )
