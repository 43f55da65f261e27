"""Tensors on the wire without torch: sizes, chunking and reassembly of raw little-endian bytes.

Used by every process, the torch-free gateway included. Embeddings are far larger than gRPC's
default 4 MiB message limit (one 13-tile InternVL2-8B image is ~26 MiB in bf16), so they always
travel as a header followed by chunks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from internvl.v1 import tensor_pb2

DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024  # one InternVL2-8B tile in bf16 (256 x 4096 x 2)

ITEMSIZE = {
    tensor_pb2.DTYPE_BFLOAT16: 2,
    tensor_pb2.DTYPE_FLOAT16: 2,
    tensor_pb2.DTYPE_FLOAT32: 4,
}
DTYPE_NAMES = {
    tensor_pb2.DTYPE_BFLOAT16: "bf16",
    tensor_pb2.DTYPE_FLOAT16: "fp16",
    tensor_pb2.DTYPE_FLOAT32: "fp32",
}
DTYPE_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class WireError(ValueError):
    """A tensor header or its bytes are malformed (bad dtype, shape, or length)."""


def make_header(dtype: int, shape: Sequence[int]) -> tensor_pb2.TensorHeader:
    header = tensor_pb2.TensorHeader(dtype=dtype, shape=list(shape))
    header.byte_length = expected_nbytes(header)
    return header


def expected_nbytes(header: tensor_pb2.TensorHeader, max_bytes: int | None = None) -> int:
    """Validate a header and return its byte size, before anything is allocated for it."""
    if header.dtype not in ITEMSIZE:
        raise WireError(f"unsupported tensor dtype {header.dtype}")
    if not header.shape or any(d < 0 for d in header.shape):
        raise WireError(f"invalid tensor shape {list(header.shape)}")
    nbytes = math.prod(header.shape) * ITEMSIZE[header.dtype]
    if header.byte_length and header.byte_length != nbytes:
        raise WireError(f"byte_length {header.byte_length} does not match shape/dtype ({nbytes} bytes)")
    if max_bytes is not None and nbytes > max_bytes:
        raise WireError(f"tensor of {nbytes} bytes exceeds the limit of {max_bytes} bytes")
    return nbytes


def iter_chunks(data: bytes | memoryview, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


class Reassembler:
    """Collects the chunks of one tensor into a preallocated buffer of exactly the announced size."""

    def __init__(self, header: tensor_pb2.TensorHeader, max_bytes: int | None = None):
        self.header = header
        self.nbytes = expected_nbytes(header, max_bytes)
        self._buf = bytearray(self.nbytes)
        self._filled = 0

    @property
    def complete(self) -> bool:
        return self._filled == self.nbytes

    def feed(self, chunk: bytes) -> int:
        """Append a chunk; returns how many of its bytes were taken (the rest belongs to the next tensor)."""
        take = min(len(chunk), self.nbytes - self._filled)
        self._buf[self._filled : self._filled + take] = chunk[:take]
        self._filled += take
        return take

    def result(self) -> bytearray:
        if not self.complete:
            raise WireError(f"tensor truncated: got {self._filled} of {self.nbytes} bytes")
        return self._buf
