"""One item's embeddings (`Entry`) and the two forms a feature-cache value takes in Redis.

An `Entry` holds its bytes as the pieces they arrived in: the encoder's chunk messages, or Redis list
elements that are those same messages, relayed to the decoder and to Redis as they are (see
`services.common.wire.Chunk`). Nothing on the gateway's byte path joins them into one buffer.

Value formats, told apart by the Redis type at the key (the key derivation is the same):
- v2, written by this gateway: a Redis list `[header, frame_0, ..., frame_{n-1}]`. Each frame is a
  serialized `{chunk: data}` message, so a cache hit is sent to the decoder without a copy. The header
  names the dtype, shape, payload length and frame count, and an xxh3-64 checksum over the header
  fields, the shape and every payload byte, so a flipped byte, a lost or doubled frame is a miss.
- v1, written by earlier gateways: one string, checksummed header + payload (`encode_entry`). Still read,
  so a rolling upgrade keeps its cache; never written.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence

import xxhash

from internvl.v1 import tensor_pb2
from services.common.wire import DEFAULT_CHUNK_BYTES, DTYPE_NAMES, Chunk, WireError, make_header

MAGIC = b"IVLF"
MAX_NDIM = 8

Buffer = bytes | bytearray | memoryview


class EntryFormatError(ValueError):
    """A cached value is not a valid entry (bad magic, version, length or checksum)."""


class Entry:
    """One item's embeddings: [num_tiles, tokens_per_tile, hidden] raw little-endian bytes.

    `payload` is one buffer or a sequence of pieces (buffers, or `Chunk`s as received), kept as given.
    Entries compare equal when dtype, shape and bytes are equal, however the bytes are cut.
    """

    __slots__ = ("dtype", "shape", "_pieces", "nbytes")

    def __init__(self, dtype: int, shape: Sequence[int], payload: Buffer | Sequence[Buffer | Chunk]):
        self.dtype = dtype  # internvl.v1.DType
        self.shape = tuple(int(d) for d in shape)
        pieces = tuple(payload) if isinstance(payload, (list, tuple)) else (payload,)
        if not 1 <= len(self.shape) <= MAX_NDIM:
            raise ValueError(f"entry shape must have 1..{MAX_NDIM} dimensions, got {self.shape}")
        if self.shape[0] >= 2**32:
            raise ValueError(f"num_tiles {self.shape[0]} does not fit the header")
        expected = make_header(self.dtype, self.shape).byte_length  # WireError on a bad dtype/shape
        nbytes = sum(len(p) if isinstance(p, Chunk) else memoryview(p).nbytes for p in pieces)
        if nbytes != expected:
            raise ValueError(f"payload has {nbytes} bytes, shape {list(self.shape)} "
                             f"{DTYPE_NAMES[self.dtype]} needs {expected}")
        self._pieces = pieces
        self.nbytes = nbytes

    @property
    def num_tiles(self) -> int:
        return self.shape[0]

    @property
    def pieces(self) -> tuple[Buffer | Chunk, ...]:
        """The bytes as they were given (for building another entry from them without a copy)."""
        return self._pieces

    @property
    def chunks(self) -> tuple[memoryview, ...]:
        """Zero-copy views of the bytes, in order."""
        return tuple(p.data if isinstance(p, Chunk) else memoryview(p).cast("B") for p in self._pieces)

    @property
    def payload(self) -> Buffer:
        """All bytes as one buffer: the buffer itself for a one-piece entry, else a joined copy (so the
        byte path uses `chunks`/`frames`; this is for callers that need contiguous bytes)."""
        if len(self._pieces) == 1 and not isinstance(self._pieces[0], Chunk):
            return self._pieces[0]
        return b"".join(self.chunks)

    def frames(self, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
        """The bytes as chunk messages of at most `max_chunk_bytes`: received chunks as they are,
        anything else (or a chunk too big for this hop) framed here, which copies it once."""
        for piece in self._pieces:
            if isinstance(piece, Chunk) and len(piece) <= max_chunk_bytes:
                yield piece
                continue
            view = piece.data if isinstance(piece, Chunk) else memoryview(piece).cast("B")
            for start in range(0, len(view), max_chunk_bytes):
                yield Chunk.wrap(view[start : start + max_chunk_bytes])

    @property
    def encoded_size(self) -> int:
        """Bytes of the v1 single-value form (the v2 list adds a few bytes of framing per chunk)."""
        return HEADER_FIXED_BYTES + 8 * len(self.shape) + self.nbytes

    def tensor_header(self) -> tensor_pb2.TensorHeader:
        return make_header(self.dtype, self.shape)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return (self.dtype, self.shape) == (other.dtype, other.shape) and _same_bytes(self.chunks, other.chunks)

    __hash__ = None  # type: ignore[assignment]  # mutable buffers inside

    def __repr__(self) -> str:
        return f"Entry(dtype={self.dtype}, shape={self.shape}, {self.nbytes} bytes in {len(self._pieces)} pieces)"


def _same_bytes(a: Sequence[memoryview], b: Sequence[memoryview]) -> bool:
    """Byte-wise equality of two piece lists cut at different places, without joining them."""
    if sum(len(v) for v in a) != sum(len(v) for v in b):
        return False
    i = j = off_a = off_b = 0
    while i < len(a) and j < len(b):
        n = min(len(a[i]) - off_a, len(b[j]) - off_b)
        if a[i][off_a : off_a + n] != b[j][off_b : off_b + n]:
            return False
        off_a, off_b = off_a + n, off_b + n
        if off_a == len(a[i]):
            i, off_a = i + 1, 0
        if off_b == len(b[j]):
            j, off_b = j + 1, 0
    return True


# ----------------------------------------------------------------------------------------------
# v2: a Redis list of a header and the chunk frames

FORMAT_VERSION = 2
# magic, version, dtype, ndim, reserved, num_tiles, payload length, frame count, then the xxh3-64 of the
# fields before it, the shape and every payload byte; then 8 bytes per shape dimension.
_V2_FIELDS = struct.Struct("<4sBBBBIQI")
_V2_CHECKSUM = struct.Struct("<Q")
V2_HEADER_FIXED_BYTES = _V2_FIELDS.size + _V2_CHECKSUM.size


def _v2_checksum(fields: bytes, shape: bytes, chunks: Sequence[memoryview]) -> int:
    # xxh3 is several times faster than zlib.crc32 (v1's) and releases the GIL: the checksum is no longer
    # a large share of a put or get.
    digest = xxhash.xxh3_64(fields)
    digest.update(shape)
    for chunk in chunks:
        digest.update(chunk)
    return digest.intdigest()


def entry_to_values(entry: Entry, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """The v2 list for `entry`: its header, then its chunk frames as they are (no copy of received ones)."""
    frames = list(entry.frames(max_chunk_bytes))
    ndim = len(entry.shape)
    fields = _V2_FIELDS.pack(MAGIC, FORMAT_VERSION, entry.dtype, ndim, 0, entry.num_tiles, entry.nbytes,
                             len(frames))
    shape = struct.pack(f"<{ndim}q", *entry.shape)
    checksum = _v2_checksum(fields, shape, [f.data for f in frames])
    return [b"".join((fields, _V2_CHECKSUM.pack(checksum), shape)), *(f.frame for f in frames)]


def entry_from_values(values: Sequence[bytes]) -> Entry:
    """Parse and verify a v2 list; EntryFormatError on any damage. The frames are kept, not copied."""
    if not values:
        raise EntryFormatError("empty list: no header")
    header = memoryview(values[0]).cast("B")
    if len(header) < V2_HEADER_FIXED_BYTES:
        raise EntryFormatError(f"truncated header: {len(header)} bytes, at least {V2_HEADER_FIXED_BYTES} needed")
    magic, version, dtype, ndim, reserved, num_tiles, payload_len, num_frames = _V2_FIELDS.unpack_from(header)
    if magic != MAGIC:
        raise EntryFormatError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise EntryFormatError(f"unsupported list entry version {version} (this gateway reads {FORMAT_VERSION})")
    if not 1 <= ndim <= MAX_NDIM or reserved != 0 or len(header) != V2_HEADER_FIXED_BYTES + 8 * ndim:
        raise EntryFormatError(f"bad header (ndim={ndim}, reserved={reserved}, {len(header)} bytes)")
    if len(values) - 1 != num_frames:
        raise EntryFormatError(f"frame count mismatch: header announces {num_frames}, the list holds "
                               f"{len(values) - 1}")
    frames = []
    for i, value in enumerate(values[1:]):
        frame = Chunk.parse(value)
        if frame is None:
            raise EntryFormatError(f"frame {i} is not a chunk message")
        frames.append(frame)
    if sum(len(f) for f in frames) != payload_len:
        raise EntryFormatError(f"length mismatch: header announces {payload_len} payload bytes, the frames "
                               f"hold {sum(len(f) for f in frames)}")
    shape_bytes = header[V2_HEADER_FIXED_BYTES:]
    (stored,) = _V2_CHECKSUM.unpack_from(header, _V2_FIELDS.size)
    computed = _v2_checksum(header[: _V2_FIELDS.size], shape_bytes, [f.data for f in frames])
    if computed != stored:
        raise EntryFormatError(f"checksum mismatch (stored {stored:016x}, computed {computed:016x})")
    return _checked_entry(dtype, struct.unpack(f"<{ndim}q", shape_bytes), frames, num_tiles)


def _checked_entry(dtype: int, shape: tuple[int, ...], payload: Buffer | list[Chunk], num_tiles: int) -> Entry:
    try:
        entry = Entry(dtype, shape, payload)
    except (WireError, ValueError) as e:
        raise EntryFormatError(f"inconsistent header: {e}") from e
    if entry.num_tiles != num_tiles:
        raise EntryFormatError(f"num_tiles {num_tiles} does not match shape {list(entry.shape)}")
    return entry


# ----------------------------------------------------------------------------------------------
# v1: one checksummed string (read only)

V1_FORMAT_VERSION = 1
# magic, version, dtype, ndim, reserved, num_tiles, payload length, then the crc32 of everything
# else (this prefix, the shape and the payload), so any flipped byte, header included, is caught.
_PREFIX = struct.Struct("<4sBBBBIQ")
_CRC = struct.Struct("<I")
HEADER_FIXED_BYTES = _PREFIX.size + _CRC.size  # 24; then 8 bytes per shape dimension


def encode_entry(entry: Entry) -> bytes:
    """The v1 single-string form (what earlier gateways wrote; kept to test that it is still read)."""
    ndim = len(entry.shape)
    prefix = _PREFIX.pack(MAGIC, V1_FORMAT_VERSION, entry.dtype, ndim, 0, entry.num_tiles, entry.nbytes)
    shape = struct.pack(f"<{ndim}q", *entry.shape)
    crc = zlib.crc32(shape, zlib.crc32(prefix))
    for chunk in entry.chunks:
        crc = zlib.crc32(chunk, crc)
    return b"".join((prefix, _CRC.pack(crc), shape, *entry.chunks))


def decode_entry(raw: bytes | bytearray | memoryview) -> Entry:
    """Parse and verify a v1 value; raises EntryFormatError on any damage. The payload is not copied."""
    view = memoryview(raw).cast("B")
    if len(view) < HEADER_FIXED_BYTES:
        raise EntryFormatError(f"truncated: {len(view)} bytes, the header alone is {HEADER_FIXED_BYTES}")
    magic, version, dtype, ndim, reserved, num_tiles, payload_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise EntryFormatError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != V1_FORMAT_VERSION:
        raise EntryFormatError(f"unsupported entry version {version} (this gateway reads {V1_FORMAT_VERSION} "
                               "as a string value)")
    if not 1 <= ndim <= MAX_NDIM or reserved != 0:
        raise EntryFormatError(f"bad header (ndim={ndim}, reserved={reserved})")
    shape_end = HEADER_FIXED_BYTES + 8 * ndim
    if len(view) != shape_end + payload_len:
        raise EntryFormatError(
            f"length mismatch: header announces {payload_len} payload bytes, "
            f"the value holds {len(view) - shape_end}"
        )
    (stored_crc,) = _CRC.unpack_from(view, _PREFIX.size)
    shape_bytes, payload = view[HEADER_FIXED_BYTES:shape_end], view[shape_end:]
    crc = zlib.crc32(payload, zlib.crc32(shape_bytes, zlib.crc32(view[: _PREFIX.size])))
    if crc != stored_crc:
        raise EntryFormatError(f"checksum mismatch (stored {stored_crc:08x}, computed {crc:08x})")
    return _checked_entry(dtype, struct.unpack(f"<{ndim}q", shape_bytes), payload, num_tiles)
