"""torch tensors <-> wire bytes (little-endian, row-major) for the model services."""

from __future__ import annotations

import sys

import torch

from internvl.v1 import tensor_pb2
from services.common.wire import make_header

TORCH_TO_WIRE = {
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
}
WIRE_TO_TORCH = {wire: dt for dt, wire in TORCH_TO_WIRE.items()}

if sys.byteorder != "little":  # the wire format is little-endian; so is every platform we target
    raise RuntimeError("big-endian hosts are not supported")


def tensor_to_wire(t: torch.Tensor, dtype: int | None = None) -> tuple[tensor_pb2.TensorHeader, memoryview]:
    """Header and raw bytes of `t` (optionally cast to the wire `dtype`); the bytes alias a CPU copy."""
    target = WIRE_TO_TORCH[dtype] if dtype else t.dtype
    cpu = t.detach().to(device="cpu", dtype=target).contiguous()
    header = make_header(TORCH_TO_WIRE[target], cpu.shape)
    # Flat first: memoryview.cast refuses a multi-dimensional view with a zero in its shape (an empty tensor).
    return header, memoryview(cpu.view(torch.uint8).numpy().reshape(-1)).cast("B")


def tensor_from_wire(header: tensor_pb2.TensorHeader, data: bytes | bytearray) -> torch.Tensor:
    """A tensor sharing `data`'s memory when it is writable (bytearray), else a copy."""
    buf = data if isinstance(data, bytearray) else bytearray(data)
    flat = torch.frombuffer(buf, dtype=WIRE_TO_TORCH[header.dtype]) if buf else torch.empty(0)
    return flat.reshape(tuple(header.shape))
