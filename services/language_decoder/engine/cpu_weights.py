"""CPU weight layouts for fast small-batch matmuls: the engine rewrites the caller's model in place.

`ModelRunner` calls `use_fast_cpu_linears(model, prepack)` when the model is on the CPU, so the
model an `LLMEngine` was given is changed for every other user too (same values, same parameter
names and shapes, nothing added to its `state_dict`):

- every plain `nn.Linear` weight is stored K-major (`kmajor_linear_weights`);
- in fp32 with `EngineConfig.cpu_prepacked_weights`, every plain `nn.Linear` is replaced in its
  parent by a `PrepackedLinear` holding a second, oneDNN-prepacked copy of the weight
  (`prepack_linear_weights`).

Only modules whose type is exactly `nn.Linear` are touched: quantized or otherwise specialised linear
modules keep their own layout and kernels. Both rewrites are idempotent.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Rows (tokens) per matmul for which the prepacked oneDNN kernel beats MKL on this project's benchmark
# machine: 10-30 % faster from 4 to 64 rows, slower for 1 row (a plain GEMV) and for prefill chunks.
_PACKED_ROWS = (2, 256)


def use_fast_cpu_linears(model: nn.Module, prepack: bool) -> None:
    """K-major weights everywhere, plus oneDNN-prepacked copies when `prepack` (fp32 models only)."""
    kmajor_linear_weights(model)
    if prepack:
        prepack_linear_weights(model)


def _plain_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, module) of every module whose type is exactly nn.Linear."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]


def kmajor_linear_weights(model: nn.Module) -> None:
    """Store every plain Linear weight [out, in] transposed in memory (same values, shape and names).

    `F.linear` then hands MKL a plain row-major [in, out] matrix, and MKL's small-batch kernels are
    2-3x faster on that layout than on the transposed one: at 16 decoding sequences the matmuls, which
    are 80% of a CPU step, rise from ~55 to ~150 GFLOP/s on this project's benchmark machine. Results
    change only in float rounding at batch 1 (a different gemv).
    """
    with torch.no_grad():
        for _, _, module in _plain_linears(model):
            if module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()


class PrepackedLinear(nn.Linear):
    """An `nn.Linear` (the same weight and bias parameters) that also holds a oneDNN-prepacked copy of
    its weight, used for 2-256 rows (decode batches); one row and long prefill chunks stay on MKL.

    Batched decode on CPU is matmul-bound: MKL repacks each weight on every call, which at 16 rows costs
    as much as the multiply; oneDNN's prepacked weights skip that. The copy doubles weight memory; it is
    a plain attribute, not a buffer, so checkpoints and `state_dict` never see it.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 16)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if _PACKED_ROWS[0] <= rows <= _PACKED_ROWS[1]:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def prepack_linear_weights(model: nn.Module) -> bool:
    """Replace every plain Linear of `model` by a `PrepackedLinear` over the same parameters.

    Returns False (nothing changed) when this torch build has no working oneDNN linear.
    """
    try:
        probe = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 4), 16)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4), probe, None, "none", [], "")
        if not torch.equal(out, torch.full((2, 8), 4.0)):
            raise RuntimeError(f"oneDNN linear gave {out.tolist()}")
    except Exception as exc:  # a CPU build without oneDNN, or the private ops changed
        log.warning("oneDNN prepacked linear unavailable (%s); decode matmuls stay on MKL", exc)
        return False
    with torch.no_grad():
        for parent, name, module in _plain_linears(model):
            setattr(parent, name, PrepackedLinear(module))
    return True
