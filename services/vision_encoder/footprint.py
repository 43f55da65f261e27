"""The vision half's parameter count (InternViT + mlp1), from the config alone: built on the meta device."""

from __future__ import annotations

import torch

from services.common.model_config import InternVLConfig
from services.vision_encoder.model import build_vision_encoder


def vision_parameters(cfg: InternVLConfig) -> int:
    with torch.device("meta"):
        encoder = build_vision_encoder(cfg)
    return sum(t.numel() for t in encoder.state_dict().values())
