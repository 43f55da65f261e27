"""The v2 feature-cache value (a Redis list of a header and chunk frames), without Redis."""

from __future__ import annotations

import array
import os
import struct
import zlib

import pytest

from gateway.feature_values import (
    V2_HEADER_FIXED_BYTES,
    Entry,
    EntryFormatError,
    decode_entry,
    encode_entry,
    entry_from_values,
    entry_to_values,
)
from internvl.v1 import tensor_pb2
from services.common.wire import Chunk, iter_chunks

BF16, FP32 = tensor_pb2.DTYPE_BFLOAT16, tensor_pb2.DTYPE_FLOAT32
SHAPE = (3, 4, 8)


def received(shape=SHAPE, chunk_bytes: int = 50, dtype: int = BF16) -> Entry:
    """An entry as EncoderClient hands it over: the chunk messages as they arrived."""
    itemsize = 2 if dtype == BF16 else 4
    data = os.urandom(shape[0] * shape[1] * shape[2] * itemsize)
    return Entry(dtype, shape, [Chunk.wrap(p) for p in iter_chunks(data, chunk_bytes)])


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_round_trip_keeps_the_received_frames(dtype):
    entry = received(dtype=dtype)
    values = entry_to_values(entry, max_chunk_bytes=64)
    assert len(values) == 1 + (4 if dtype == BF16 else 8)  # header + 192 (bf16) / 384 (fp32) bytes by 50
    if dtype == BF16:
        assert all(v is p.frame for v, p in zip(values[1:], entry.pieces, strict=True))  # not copied
    assert len(values[0]) == V2_HEADER_FIXED_BYTES + 8 * len(SHAPE)
    back = entry_from_values(values)
    assert back == entry and (back.dtype, back.shape, back.num_tiles) == (dtype, SHAPE, 3)
    # What a get returns is ready to send: the same bytes objects, framed.
    assert all(f.frame is v for f, v in zip(back.frames(), values[1:], strict=True))


def test_a_contiguous_payload_is_framed_once():
    data = os.urandom(3 * 4 * 8 * 2)
    values = entry_to_values(Entry(BF16, SHAPE, data), max_chunk_bytes=100)
    assert [len(Chunk.parse(v)) for v in values[1:]] == [100, 92]
    assert bytes(entry_from_values(values).payload) == data


def test_every_corrupted_header_byte_is_detected():
    values = entry_to_values(received())
    header = values[0]
    for i in range(len(header)):
        for flip in (0x01, 0x80):
            damaged = bytearray(header)
            damaged[i] ^= flip
            with pytest.raises(EntryFormatError):
                entry_from_values([bytes(damaged), *values[1:]])


def test_a_flipped_payload_byte_is_detected():
    values = entry_to_values(received())
    frame = bytearray(values[2])
    frame[-3] ^= 0x40
    with pytest.raises(EntryFormatError, match="checksum"):
        entry_from_values([values[0], values[1], bytes(frame), *values[3:]])


@pytest.mark.parametrize("damage, message", [
    (lambda v: v[:-1], "frame count"),  # the last frame lost
    (lambda v: v + v[1:], "frame count"),  # two writers' RPUSHes after one DEL
    (lambda v: [v[0], v[2], v[1], *v[3:]], "checksum"),  # frames out of order
    (lambda v: [v[0], v[1][:-1], *v[2:]], "frame 0 is not a chunk message"),  # a truncated frame
    (lambda v: [v[0], b"garbage", *v[2:]], "frame 0 is not a chunk message"),
    (lambda v: [v[0][:10], *v[1:]], "truncated header"),
    (lambda v: [b"XXXX" + v[0][4:], *v[1:]], "magic"),
    (lambda v: [v[0][:4] + bytes([3]) + v[0][5:], *v[1:]], "version"),
    (lambda v: [], "empty"),
])
def test_damage_gives_a_clear_error(damage, message):
    with pytest.raises(EntryFormatError, match=message):
        entry_from_values(damage(entry_to_values(received())))


def test_frames_that_do_not_add_up_to_the_header_are_rejected():
    values = entry_to_values(received(chunk_bytes=64))
    shorter = Chunk.wrap(bytes(Chunk.parse(values[-1]).data)[:-2]).frame
    with pytest.raises(EntryFormatError, match="length mismatch"):
        entry_from_values([*values[:-1], shorter])


def test_a_header_that_lies_consistently_about_the_shape_is_rejected():
    # Re-checksummed by the writer, but the shape does not match the payload size.
    entry = received()
    lying = Entry(BF16, (3, 4, 8), list(entry.pieces))
    values = entry_to_values(lying)
    header = bytearray(values[0])
    struct.pack_into("<q", header, V2_HEADER_FIXED_BYTES, 4)  # shape[0]: 3 -> 4
    with pytest.raises(EntryFormatError):  # caught by the checksum, or by the size check behind it
        entry_from_values([bytes(header), *values[1:]])


def test_a_v1_string_is_not_a_v2_list():
    with pytest.raises(EntryFormatError):
        entry_from_values([encode_entry(received())])


@pytest.mark.parametrize(("shape", "payload", "message"), [
    ((), b"", "entry shape must have 1..8 dimensions, got ()"),
    ((1,) * 9, b"\0" * 4, "entry shape must have 1..8 dimensions, got (1, 1, 1, 1, 1, 1, 1, 1, 1)"),
    ((2**32, 0), b"", "num_tiles 4294967296 does not fit the header"),
    ((1, 2), b"\0" * 3, "payload has 3 bytes, shape [1, 2] fp32 needs 8"),
    ((1, 2), [b"\0" * 4, b"\0" * 5], "payload has 9 bytes, shape [1, 2] fp32 needs 8"),
])
def test_an_entry_that_cannot_be_stored_says_why(shape, payload, message):
    with pytest.raises(ValueError) as info:
        Entry(tensor_pb2.DTYPE_FLOAT32, shape, payload)
    assert str(info.value) == message


def test_entries_at_the_header_limits_are_accepted():
    assert Entry(tensor_pb2.DTYPE_FLOAT32, (1,) * 8, b"\0" * 4).shape == (1,) * 8
    assert Entry(tensor_pb2.DTYPE_FLOAT32, (2**32 - 1, 0), b"").num_tiles == 2**32 - 1
    assert Entry(tensor_pb2.DTYPE_FLOAT32, (1, 2), [b"\0" * 4, b"\0" * 4]).nbytes == 8


def test_one_dimension_and_typed_buffers_count_their_bytes():
    assert Entry(tensor_pb2.DTYPE_FLOAT32, (2,), b"\0" * 8).shape == (2,)
    floats = memoryview(array.array("f", [1.0, 2.0]))  # 2 items, 8 bytes: the byte count is what matters
    assert Entry(tensor_pb2.DTYPE_FLOAT32, (2,), floats).nbytes == 8


@pytest.mark.parametrize("shape", [(3,), (1,) * 8])
def test_v1_values_of_one_and_of_eight_dimensions_read_back(shape):
    entry = Entry(tensor_pb2.DTYPE_FLOAT32, shape, bytes(range(4 * shape[0])))
    assert decode_entry(encode_entry(entry)) == entry
    assert entry_from_values(entry_to_values(entry)) == entry


def test_a_v1_header_with_reserved_bits_says_so():
    raw = bytearray(encode_entry(Entry(tensor_pb2.DTYPE_FLOAT32, (1,), b"\0" * 4)))
    raw[7] = 1  # magic (4), version, dtype, ndim, reserved
    with pytest.raises(EntryFormatError, match=r"^bad header \(ndim=1, reserved=1\)$"):
        decode_entry(bytes(raw))


def test_a_received_chunk_of_exactly_the_hop_size_is_relayed_as_it_is():
    chunk = Chunk.wrap(b"\1" * 16)
    entry = Entry(tensor_pb2.DTYPE_FLOAT32, (4,), [chunk])
    assert [f is chunk for f in entry.frames(16)] == [True]
    assert [len(f) for f in entry.frames(15)] == [15, 1]  # bigger than the hop: framed again


def _v1_value(num_tiles: int, shape: tuple[int, ...], payload: bytes, version: int = 1) -> bytes:
    """A v1 string value built field by field (magic, version, dtype, ndim, reserved, num_tiles, length,
    crc32 over the rest), so its header may say what encode_entry never would."""
    prefix = struct.pack("<4sBBBBIQ", b"IVLF", version, tensor_pb2.DTYPE_FLOAT32, len(shape), 0, num_tiles,
                         len(payload))
    shape_bytes = struct.pack(f"<{len(shape)}q", *shape)
    crc = zlib.crc32(payload, zlib.crc32(shape_bytes, zlib.crc32(prefix)))
    return prefix + struct.pack("<I", crc) + shape_bytes + payload


@pytest.mark.parametrize(("value", "message"), [
    (_v1_value(5, (1,), b"\0" * 4), "num_tiles 5 does not match shape [1]"),
    (_v1_value(1, (1,), b"\0" * 4)[:-4], "length mismatch: header announces 4 payload bytes, the value holds 0"),
    (_v1_value(1, (1,), b"\0" * 4, version=3),
     "unsupported entry version 3 (this gateway reads 1 as a string value)"),
])
def test_v1_damage_is_named(value, message):
    with pytest.raises(EntryFormatError) as info:
        decode_entry(value)
    assert str(info.value) == message


def test_v2_damage_is_named():
    values = entry_to_values(Entry(tensor_pb2.DTYPE_FLOAT32, (1,), b"\0" * 4))
    with pytest.raises(EntryFormatError, match=r"^empty list: no header$"):
        entry_from_values([])
    reserved = bytearray(values[0])
    reserved[7] = 1  # magic (4), version, dtype, ndim, reserved
    with pytest.raises(EntryFormatError, match=rf"^bad header \(ndim=1, reserved=1, {len(reserved)} bytes\)$"):
        entry_from_values([bytes(reserved), *values[1:]])
    with pytest.raises(EntryFormatError, match=rf"^frame count mismatch: header announces {len(values) - 1}, "
                                               rf"the list holds {len(values)}$"):
        entry_from_values([*values, values[-1]])
