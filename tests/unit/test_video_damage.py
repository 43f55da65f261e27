"""A video whose chunk offset table points outside the file is refused before decord opens it.

decord followed such an offset and the process died with SIGSEGV (rc 139): one upload could kill the
encoder. The crash itself is reproduced in a child process, so the test shows the check is what saves it.
"""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from services.common.video_probe import _mp4_find, damaged_chunk_offsets
from services.vision_encoder.preprocess import read_video_frames
from tests.conftest import load_kit

KIT = load_kit()


def kit_video() -> bytes:
    return KIT.path(KIT.video["file"]).read_bytes()


def with_first_chunk_offset(data: bytes, offset: int) -> bytes:
    path = (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stco")
    (body, _end), *_ = list(_mp4_find(data, 0, len(data), path))
    out = bytearray(data)
    struct.pack_into(">I", out, body + 8, offset)  # version/flags (4), entry count (4), first offset
    return bytes(out)


def test_the_kits_video_is_not_damaged():
    assert damaged_chunk_offsets(kit_video()) is None
    assert len(read_video_frames(kit_video(), num_segments=2)[1]) == 2


def test_an_offset_beyond_the_file_is_refused_before_decoding():
    data = with_first_chunk_offset(kit_video(), 10**8)
    assert damaged_chunk_offsets(data) == (
        f"chunk 0 of its stco table starts at byte {10**8}, beyond its {len(data)} bytes")
    with pytest.raises(ValueError, match=r"^the video container is damaged: chunk 0 of its stco table"):
        read_video_frames(data, num_segments=4)


def test_the_last_byte_is_a_valid_offset_and_the_length_is_not():
    data = kit_video()
    assert damaged_chunk_offsets(with_first_chunk_offset(data, len(data) - 1)) is None
    assert damaged_chunk_offsets(with_first_chunk_offset(data, len(data))) is not None


def test_a_table_that_declares_more_offsets_than_it_holds_is_refused():
    data = bytearray(kit_video())
    (body, _end), *_ = list(_mp4_find(data, 0, len(data), (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stco")))
    struct.pack_into(">I", data, body + 4, 10**6)
    assert "declares 1000000 chunk offsets but holds fewer" in damaged_chunk_offsets(bytes(data))


def test_what_the_check_prevents_kills_a_process_that_skips_it(tmp_path):
    """decord itself, given the damaged bytes, crashes its process (why the check must come first)."""
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(with_first_chunk_offset(kit_video(), 10**8))
    code = ("import io, sys\nfrom decord import VideoReader, cpu\n"
            f"vr = VideoReader(io.BytesIO(open({str(bad)!r}, 'rb').read()), ctx=cpu(0), num_threads=1)\n"
            "[vr[i].asnumpy() for i in range(0, len(vr), max(len(vr) // 4, 1))]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -11, (proc.returncode, proc.stderr[-500:])  # SIGSEGV
