import pytest
import torch

from internvl.v1 import tensor_pb2
from services.common.tensors import tensor_from_wire, tensor_to_wire
from services.common.wire import Reassembler, WireError, expected_nbytes, iter_chunks, make_header


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_through_chunks(dtype):
    t = torch.randn(3, 5, 7).to(dtype)
    header, data = tensor_to_wire(t)
    assert header.byte_length == t.numel() * t.element_size()
    r = Reassembler(header)
    for chunk in iter_chunks(data, chunk_bytes=37):
        assert r.feed(chunk) == len(chunk)
    assert torch.equal(tensor_from_wire(header, r.result()), t)


def test_cast_on_the_wire_and_little_endian_layout():
    t = torch.tensor([1.0, -2.0], dtype=torch.float32)
    header, data = tensor_to_wire(t, dtype=tensor_pb2.DTYPE_BFLOAT16)
    assert header.dtype == tensor_pb2.DTYPE_BFLOAT16
    assert bytes(data) == bytes([0x80, 0x3F, 0x00, 0xC0])  # bf16 1.0 = 0x3f80, -2.0 = 0xc000


def test_reassembler_takes_only_its_bytes_and_detects_truncation():
    header = make_header(tensor_pb2.DTYPE_FLOAT32, [2])
    r = Reassembler(header)
    assert r.feed(b"\x00" * 12) == 8  # the extra 4 bytes belong to the next tensor
    assert r.complete
    r2 = Reassembler(header)
    r2.feed(b"\x00" * 3)
    with pytest.raises(WireError, match="truncated"):
        r2.result()


@pytest.mark.parametrize(
    "header, match",
    [
        (tensor_pb2.TensorHeader(dtype=0, shape=[1]), "dtype"),
        (tensor_pb2.TensorHeader(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[]), "shape"),
        (tensor_pb2.TensorHeader(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, -1]), "shape"),
        (tensor_pb2.TensorHeader(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2], byte_length=9), "byte_length"),
    ],
)
def test_bad_headers_are_rejected(header, match):
    with pytest.raises(WireError, match=match):
        expected_nbytes(header)


def test_size_limit_checked_before_allocation():
    huge = make_header(tensor_pb2.DTYPE_BFLOAT16, [13, 256, 4096])
    with pytest.raises(WireError, match="exceeds"):
        Reassembler(huge, max_bytes=1 << 20)


def test_reassembler_counts_what_it_already_holds():
    header = make_header(tensor_pb2.DTYPE_FLOAT32, [2])
    r = Reassembler(header)
    assert r.header is header
    assert r.feed(b"\x01" * 3) == 3
    assert r.feed(b"\x02" * 12) == 5  # only what is left of the 8 bytes
    assert r.complete and bytes(r.result()) == b"\x01" * 3 + b"\x02" * 5


def test_size_limit_is_inclusive():
    header = make_header(tensor_pb2.DTYPE_FLOAT32, [4])
    assert expected_nbytes(header, max_bytes=16) == 16
    with pytest.raises(WireError, match="exceeds the limit of 15 bytes"):
        expected_nbytes(header, max_bytes=15)


def test_empty_tensors_round_trip():
    t = torch.empty(0, 4)
    header, data = tensor_to_wire(t)
    assert list(header.shape) == [0, 4] and expected_nbytes(header) == 0 and len(data) == 0
    assert tensor_from_wire(header, bytes(data)).shape == (0, 4)


def test_wire_bytes_are_unsigned_and_reading_shares_only_writable_buffers():
    header, data = tensor_to_wire(torch.tensor([-1.0]))  # 0x00 0x00 0x80 0xbf
    assert data.format == "B" and list(data) == [0x00, 0x00, 0x80, 0xBF]
    shared = bytearray(data)
    t = tensor_from_wire(header, shared)
    t.add_(1.0)  # a bytearray is used in place ...
    assert bytes(shared) == bytes(tensor_to_wire(torch.tensor([0.0]))[1])
    frozen = bytes(data)
    t = tensor_from_wire(header, frozen)
    t.add_(1.0)  # ... bytes are copied first, and never written
    assert frozen == bytes(data) and t.tolist() == [0.0]
