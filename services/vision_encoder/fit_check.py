"""The encoder's start-up fit check: refuse, before any weight is read, a vision tower its device cannot hold.

It counts (rules in services/common/fit.py) the weights of InternViT + mlp1 in `--dtype` and the
activations of one `--max-batch-tiles` batch.
"""

from __future__ import annotations

from pathlib import PurePath

import torch

from services.common.fit import DeviceMemory, Need, check_fits, encoder_need, gib
from services.common.model_config import InternVLConfig
from services.common.tensors import TORCH_TO_WIRE
from services.common.wire import DTYPE_NAMES
from services.vision_encoder.config import EncoderConfig
from services.vision_encoder.footprint import vision_parameters


def check_encoder_fits(config: EncoderConfig, model_config: InternVLConfig, device: str, dtype: torch.dtype,
                       memory: DeviceMemory | None) -> Need:
    """Raise `ModelDoesNotFit` (services/common/fit.py) with what to do when the tower cannot fit `memory`."""
    name = DTYPE_NAMES[TORCH_TO_WIRE[dtype]]
    need = encoder_need(f"{PurePath(config.model.rstrip('/')).name} vision encoder", vision_parameters(model_config),
                        model_config.vision, name, config.max_batch_tiles)
    if memory is None or need.fits(memory):
        return need
    advice = ["--dtype bf16 (half the bytes of fp32)"] if name == "fp32" else []
    advice.append("a smaller --max-batch-tiles (activations grow with the tiles of a batch)")
    where = "a machine with more free RAM, or a GPU" if torch.device(device).type == "cpu" else "a GPU"
    advice.append(f"{where} with {gib(need.total)} usable")
    check_fits(need, memory, advice, "Splitting the tower across several GPUs is not supported yet.")
    return need
