"""Weight-only int8 for the InternLM2 decoder layers (the scheme gpt-fast and torchao use for decode).

Every linear layer inside the decoder blocks (the fused `wqkv`, `wo`, `w1`, `w2`, `w3`) keeps its weight
as int8 with one scale per output channel, `w ~= q * scale`, symmetric, `q` in [-127, 127]. The token
embedding, the norms and the output head stay in the compute dtype. Activations are never quantised: a
matmul multiplies compute-dtype activations by the int8 weight and scales the output channels, so only
the weights' rounding changes results (about 0.4 % of a row's largest weight, per weight).

Where the bytes go: decode of one stream reads every weight once per token, so int8 weights halve the
bytes read against bf16 (a quarter against fp32). The matmul kernels:

- GPU, compiled layers (the default on CUDA): the dequantise-then-matmul below is traced by
  torch.compile. A one-row matmul (single-stream decode) is written as multiply-and-sum, which
  Inductor fuses with the int8 -> bf16 conversion into one kernel that reads the int8 weight once
  (gpt-fast gets the same form from Inductor's own one-row matmul decomposition, which needs
  `coordinate_descent_tuning`; writing it out keeps it independent of that global setting). More rows
  go to a regular matmul after a conversion kernel (with `--compile-mode max-autotune-no-cudagraphs`
  Inductor may fuse that conversion into its matmul template). Uncompiled layers on a GPU are correct
  but slow (the weight is dequantised on every call).
- CPU: torch's int8 weight-only matmul (`aten._weight_int8pack_mm`) for bf16 / fp16 activations, after
  a one-time probe that it exists and matches the plain computation; fp32 activations (CPU's default
  compute dtype) dequantise then matmul, because that kernel has no vectorised fp32 path (35-70x
  slower than MKL's fp32 matmul in a microbenchmark on this project's shared CPU machine).

Quantising happens as the checkpoint is read (`int8_loader`): each bf16 tensor is turned into int8 +
scales right after it is read, so the whole bf16 model never sits on the device. `quantize_model`
converts a model already in memory (tests, benchmarks, the engine's `quantize` setting).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.common.quantization import INT8, NO_QUANTIZATION, check_quantize

_QMAX = 127  # symmetric: -128 is never used, so q and -q are both representable


def quantize_per_channel(weight: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(int8 weight [out, in], scales [out] in `scale_dtype`) with `weight ~= q * scales[:, None]`.

    The scale is rounded to `scale_dtype` before the weights are divided by it, so the stored scale is
    exactly the one the int8 values were computed against: storing it in bf16 adds no error.
    """
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    # An all-zero row gets scale 1 (any scale represents it exactly) rather than 0 (division by zero).
    scales = torch.where(absmax > 0, absmax / _QMAX, torch.ones_like(absmax)).to(scale_dtype)
    q = torch.round(w / scales.float()[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q, scales


@functools.cache
def _cpu_int8_kernel_ok(dtype: torch.dtype) -> bool:
    """Whether `aten._weight_int8pack_mm` exists in this torch build and agrees with the plain math."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=gen).to(dtype)
    q = torch.randint(-_QMAX, _QMAX + 1, (48, 64), generator=gen, dtype=torch.int8)
    scales = (torch.rand(48, generator=gen) + 0.5).to(dtype)
    try:
        out = op(x, q, scales).float()
    except RuntimeError:
        return False
    expected = (x.float() @ q.float().t()) * scales.float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return out.shape == expected.shape and bool(torch.allclose(out, expected, rtol=tol, atol=tol * 64))


class Int8Linear(nn.Module):
    """A bias-optional linear layer whose weight is int8 with per-output-channel `scales`.

    Same state-dict names as `nn.Linear` (`weight`, `bias`) plus `scales`, so a quantised model loads
    by name like the original. Deliberately not an `nn.Linear` subclass: code that rewrites
    `nn.Linear` weights (the engine's CPU weight layouts) must not touch int8 ones.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device | str | None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        # Decided here, outside any compiled region: the probe runs once per dtype.
        self.cpu_kernel = dtype != torch.float32 and _cpu_int8_kernel_ok(dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> Int8Linear:
        q, scales = quantize_per_channel(linear.weight, dtype)
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, "meta")
        out.weight, out.scales = q, scales
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.cpu_kernel and x.device.type == "cpu" and x.dtype == self.scales.dtype:
            rows = x.reshape(-1, self.in_features).contiguous()
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
            out = out.view(*x.shape[:-1], self.out_features)
        elif torch.compiler.is_compiling() and x.numel() == self.in_features:
            # One row (single-stream decode): a GEMV as multiply-and-sum, which Inductor turns into one
            # reduction kernel reading the int8 weight once (a matmul would first write a bf16 copy).
            # Products and sum in fp32, as a matmul accumulates; nothing here is materialised.
            out = (x.reshape(1, self.in_features).float() * self.weight.float()).sum(dim=-1)
            out = (out * self.scales.float()).to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _block_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every `nn.Linear` inside the decoder blocks (not the head).

    The layers themselves are not kept in the list, so each is freed as soon as it is replaced.
    """
    return [
        (parent, name)
        for parent in model.model.layers.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def quantize_model(model: nn.Module, mode: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Swap the decoder blocks' linear layers for `Int8Linear` in place (mode "int8"); idempotent.

    `dtype` is the compute dtype (scales, bias); default: the model's. Layers are converted one by one,
    so the peak is the model plus one layer's int8 copy. A model built on the meta device gets empty
    `Int8Linear` layers, ready for `int8_loader`'s tensors.
    """
    if check_quantize(mode) == NO_QUANTIZATION:
        return model
    dtype = dtype or model.dtype
    with torch.no_grad():
        for parent, name in _block_linears(model):
            linear = getattr(parent, name)
            if linear.weight.is_meta:
                layer = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype, "meta")
            else:
                layer = Int8Linear.from_linear(linear, dtype)
            setattr(parent, name, layer)
            del linear, layer
    return model


def int8_loader(model: nn.Module, dtype: torch.dtype) -> Callable[[str, Tensor], dict[str, Tensor]]:
    """Prepare a meta-device model for an int8 load; returns the per-tensor conversion for the loader.

    The conversion turns each decoder-block linear weight into `weight` (int8) + `scales` as soon as it
    is read, and casts every other tensor to `dtype`.
    """
    quantize_model(model, INT8, dtype)
    targets = {
        f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Int8Linear)
    }

    def convert(name: str, tensor: Tensor) -> dict[str, Tensor]:
        if name in targets:
            q, scales = quantize_per_channel(tensor, dtype)
            return {name: q, name.removesuffix("weight") + "scales": scales}
        return {name: tensor.to(dtype)}

    return convert


def quantization_of(model: nn.Module) -> str:
    """The quantisation of `model`'s decoder blocks: "int8" or "none"."""
    return INT8 if any(isinstance(m, Int8Linear) for m in model.modules()) else NO_QUANTIZATION


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held (parameters and persistent buffers, int8 ones included)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
