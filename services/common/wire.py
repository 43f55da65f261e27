"""Tensors on the wire without torch: sizes, chunking and reassembly of raw little-endian bytes.

Used by every process, the torch-free gateway included. Embeddings are far larger than gRPC's
default 4 MiB message limit (one 13-tile InternVL2-8B image is ~26 MiB in bf16), so they always
travel as a header followed by chunks.

A chunk is relayed without being parsed or copied: `Chunk` keeps the serialized `{chunk: data}`
message it arrived in (the same bytes for `EncodeResponse` and `GenerateRequest`, which both declare
`bytes chunk = 2`), and `chunk_or` / `serialize_chunk_or_message` are the gRPC (de)serializers that
let a stream carry such chunks next to ordinary messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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


class ChunkCollector:
    """Collects the chunks of one tensor as they arrived (nothing copied), checking that they add up to
    exactly the announced size: the relay's counterpart of `Reassembler`."""

    def __init__(self, header: tensor_pb2.TensorHeader, max_bytes: int | None = None):
        self.header = header
        self.nbytes = expected_nbytes(header, max_bytes)
        self._chunks: list[Chunk] = []
        self._filled = 0

    @property
    def complete(self) -> bool:
        return self._filled == self.nbytes

    def add(self, chunk: Chunk) -> None:
        if self._filled + len(chunk) > self.nbytes:
            raise WireError(f"chunk of {len(chunk)} bytes overruns the tensor: {self.nbytes - self._filled} "
                            f"of its {self.nbytes} bytes were left")
        self._chunks.append(chunk)
        self._filled += len(chunk)

    def result(self) -> list[Chunk]:
        if not self.complete:
            raise WireError(f"tensor truncated: got {self._filled} of {self.nbytes} bytes")
        return self._chunks


# ----------------------------------------------------------------------------------------------
# Chunks relayed as serialized messages

# `bytes chunk = 2` in EncodeResponse and GenerateRequest: field 2, wire type 2 (length-delimited).
CHUNK_TAG = (2 << 3) | 2
_MAX_VARINT_BYTES = 10


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class Chunk:
    """Tensor bytes inside their serialized message `{chunk: data}`: `frame` is what goes on the wire (or
    into Redis) as it is, `data` a zero-copy view of the tensor bytes in it."""

    __slots__ = ("frame", "data")

    def __init__(self, frame: bytes, offset: int):
        self.frame = frame
        self.data = memoryview(frame)[offset:]

    def __len__(self) -> int:
        return len(self.data)

    @classmethod
    def wrap(cls, data: bytes | bytearray | memoryview) -> Chunk:
        """Frame raw tensor bytes (one copy: the message must be one bytes object for gRPC)."""
        view = memoryview(data).cast("B")
        prefix = bytes((CHUNK_TAG,)) + _varint(len(view))
        return cls(b"".join((prefix, view)), len(prefix))

    @classmethod
    def parse(cls, frame: bytes) -> Chunk | None:
        """The chunk when `frame` is exactly one serialized `chunk` field, else None (parse it as a message).

        Anything else a valid sender may produce (a header, unknown fields, a repeated field) is left to
        protobuf, so this only ever takes the fast path where its answer is the same as protobuf's.
        """
        if len(frame) < 2 or frame[0] != CHUNK_TAG:
            return None
        length = shift = 0
        for pos in range(1, min(len(frame), 1 + _MAX_VARINT_BYTES)):
            byte = frame[pos]
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                offset = pos + 1
                return cls(frame, offset) if offset + length == len(frame) else None
            shift += 7
        return None


def chunk_or(message_type: Any) -> Callable[[bytes], Any]:
    """A gRPC response/request deserializer: a `Chunk` for a bare chunk message (no parse, no copy),
    `message_type.FromString` for anything else."""

    def deserialize(raw: bytes) -> Any:
        chunk = Chunk.parse(raw)
        return chunk if chunk is not None else message_type.FromString(raw)

    return deserialize


def serialize_chunk_or_message(message: Any) -> bytes:
    """A gRPC serializer that sends a `Chunk`'s frame as it is and serializes any other message."""
    return message.frame if isinstance(message, Chunk) else message.SerializeToString()
