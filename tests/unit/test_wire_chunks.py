"""Chunks relayed as their serialized messages (services/common/wire.py) and the Entry that holds them."""

from __future__ import annotations

import os

import pytest

from gateway.feature_values import Entry
from internvl.v1 import decoder_pb2, tensor_pb2, vision_pb2
from services.common.wire import (
    Chunk,
    ChunkCollector,
    WireError,
    chunk_or,
    make_header,
    serialize_chunk_or_message,
)

BF16 = tensor_pb2.DTYPE_BFLOAT16


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16_383, 16_384, 2 * 1024 * 1024 + 3])
def test_a_wrapped_chunk_is_byte_for_byte_the_protobuf_message_of_both_streams(size):
    data = os.urandom(size)
    chunk = Chunk.wrap(data)
    assert chunk.frame == vision_pb2.EncodeResponse(chunk=data).SerializeToString()
    assert chunk.frame == decoder_pb2.GenerateRequest(chunk=data).SerializeToString()
    assert bytes(chunk.data) == data and len(chunk) == size
    parsed = Chunk.parse(chunk.frame)
    assert parsed is not None and parsed.frame is chunk.frame and bytes(parsed.data) == data


def test_parse_leaves_everything_but_a_bare_chunk_to_protobuf():
    header = vision_pb2.EncodeResponse(header=vision_pb2.EmbeddingHeader(index=1, num_tiles=2,
                                                                        tensor=make_header(BF16, (2, 3))))
    frame = Chunk.wrap(b"abc").frame
    not_bare = [
        header.SerializeToString(),
        frame + b"\x18\x01",  # an unknown varint field after the chunk
        frame[:-1],  # truncated
        frame + b"x",  # a byte too many
        b"",
        b"\x12",  # a tag without a length
        b"\x12" + b"\xff" * 11,  # a length varint that never ends
    ]
    for raw in not_bare:
        assert Chunk.parse(raw) is None, raw
    deserialize = chunk_or(vision_pb2.EncodeResponse)
    assert deserialize(header.SerializeToString()) == header
    # With an unknown field beside it, protobuf still finds the chunk: nothing is lost on the slow path.
    assert deserialize(frame + b"\x18\x01").chunk == b"abc"
    assert isinstance(deserialize(frame), Chunk)


def test_the_serializer_sends_a_chunk_frame_as_it_is():
    chunk = Chunk.wrap(b"payload")
    assert serialize_chunk_or_message(chunk) is chunk.frame
    setup = decoder_pb2.GenerateRequest(setup=decoder_pb2.GenerateSetup(request_id="r"))
    assert serialize_chunk_or_message(setup) == setup.SerializeToString()


def test_collector_checks_sizes_without_copying():
    header = make_header(BF16, (2, 4))  # 16 bytes
    chunks = [Chunk.wrap(os.urandom(n)) for n in (5, 11)]
    collector = ChunkCollector(header)
    collector.add(chunks[0])
    assert not collector.complete
    with pytest.raises(WireError, match="truncated: got 5 of 16"):
        collector.result()
    collector.add(chunks[1])
    assert collector.result() == chunks and all(a is b for a, b in zip(collector.result(), chunks, strict=True))
    with pytest.raises(WireError, match="overruns the tensor"):
        collector.add(Chunk.wrap(b"x"))
    with pytest.raises(WireError, match="exceeds the limit"):
        ChunkCollector(header, max_bytes=15)


def _pieces(data: bytes, cuts: list[int]) -> list[Chunk]:
    bounds = [0, *cuts, len(data)]
    return [Chunk.wrap(data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def test_entry_relays_received_chunks_as_the_same_objects():
    data = os.urandom(2 * 4 * 8 * 2)
    pieces = _pieces(data, [40, 100])
    entry = Entry(BF16, (2, 4, 8), pieces)
    assert entry.nbytes == len(data) and entry.num_tiles == 2
    frames = list(entry.frames(max_chunk_bytes=64))
    assert frames[0] is pieces[0] and frames[2] is pieces[2]  # fit: passed through, no copy
    assert [len(f) for f in frames[1:2]] == [60]
    assert b"".join(bytes(f.data) for f in entry.frames(max_chunk_bytes=16)) == data
    assert all(len(f) <= 16 for f in entry.frames(max_chunk_bytes=16))
    assert bytes(entry.payload) == data and [bytes(c) for c in entry.chunks] == [data[:40], data[40:100], data[100:]]


def test_entries_compare_by_bytes_however_they_are_cut():
    data = os.urandom(2 * 4 * 8 * 2)
    a = Entry(BF16, (2, 4, 8), _pieces(data, [40, 100]))
    b = Entry(BF16, (2, 4, 8), _pieces(data, [1, 64, 65]))
    c = Entry(BF16, (2, 4, 8), data)
    assert a == b == c
    flipped = bytearray(data)
    flipped[77] ^= 1
    assert a != Entry(BF16, (2, 4, 8), bytes(flipped))
    assert a != Entry(BF16, (4, 2, 8), data)


def test_entry_checks_the_pieces_add_up():
    with pytest.raises(ValueError, match="payload has 15 bytes"):
        Entry(BF16, (2, 4), [Chunk.wrap(b"x" * 10), b"y" * 5])
