"""The container probe (services/common/video_probe.py) on MP4 boxes built byte by byte: box-size forms, track
kinds, the sample entry's bounds, and which of several video tracks is the largest."""

from __future__ import annotations

import struct

from services.common.video_probe import _mp4_boxes, declared_video_size


def box(kind: bytes, body: bytes = b"") -> bytes:
    return struct.pack(">I4s", 8 + len(body), kind) + body


def box64(kind: bytes, body: bytes = b"") -> bytes:
    """A box with the 64-bit size form (size field 1, then the real size as 8 bytes)."""
    return struct.pack(">I4sQ", 1, kind, 16 + len(body)) + body


def sample_entry(width: int, height: int) -> bytes:
    # size, format, reserved (6), data_reference_index (2), pre_defined/reserved (16), width, height
    return struct.pack(">I4s6sH16sHH", 36, b"avc1", b"\0" * 6, 1, b"\0" * 16, width, height)


def track(handler: bytes, width: int, height: int, stsd_body: bytes | None = None) -> bytes:
    hdlr = box(b"hdlr", b"\0" * 8 + handler + b"\0" * 12)
    stsd = box(b"stsd", stsd_body if stsd_body is not None else b"\0\0\0\0\0\0\0\x01" + sample_entry(width, height))
    return box(b"trak", box(b"mdia", hdlr + box(b"minf", box(b"stbl", stsd))))


FTYP = box(b"ftyp", b"isom\0\0\0\0isom")


def test_boxes_of_each_size_form():
    empty = box(b"free")
    assert list(_mp4_boxes(empty, 0, len(empty))) == [(b"free", 8, 8)]  # an 8-byte box at the very end
    wide = box64(b"free")
    assert list(_mp4_boxes(wide, 0, len(wide))) == [(b"free", 16, 16)]  # a 16-byte 64-bit box at the end
    to_end = FTYP + struct.pack(">I4s", 0, b"mdat") + b"xyzw"  # size 0: up to the end of the enclosing box
    assert list(_mp4_boxes(to_end, 0, len(to_end))) == [(b"ftyp", 8, len(FTYP)), (b"mdat", len(FTYP) + 8, len(to_end))]
    after = FTYP + box64(b"moov", b"abcd") + box(b"free")
    assert list(_mp4_boxes(after, 0, len(after))) == [
        (b"ftyp", 8, len(FTYP)), (b"moov", len(FTYP) + 16, len(FTYP) + 20), (b"free", len(FTYP) + 28, len(after))]


def test_a_truncated_64_bit_header_stops_the_walk():
    data = FTYP + struct.pack(">I4s", 1, b"moov") + b"\0\0\0"  # fewer than 16 bytes left
    assert list(_mp4_boxes(data, 0, len(data))) == [(b"ftyp", 8, len(FTYP))]


def test_a_video_track_after_an_audio_track():
    data = FTYP + box(b"moov", track(b"soun", 0, 0) + track(b"vide", 640, 360))
    assert declared_video_size(data) == (640, 360)


def test_a_moov_with_the_64_bit_size_form():
    data = FTYP + box64(b"moov", track(b"vide", 320, 240))
    assert declared_video_size(data) == (320, 240)


def test_widths_above_32767_are_unsigned():
    data = FTYP + box(b"moov", track(b"vide", 40000, 300))
    assert declared_video_size(data) == (40000, 300)


def test_the_largest_area_wins_among_video_tracks():
    tracks = track(b"vide", 100, 1000) + track(b"vide", 1000, 200) + track(b"vide", 1200, 10)
    assert declared_video_size(FTYP + box(b"moov", tracks)) == (1000, 200)


def test_the_sample_entry_must_fit_in_its_stsd():
    exact = b"\0" * 8 + sample_entry(64, 48)  # the entry's width/height end exactly at the box's end
    assert declared_video_size(FTYP + box(b"moov", track(b"vide", 0, 0, exact))) == (64, 48)
    short = exact[:-1]  # one byte short: no size declared, even with more data after the box
    data = FTYP + box(b"moov", track(b"vide", 0, 0, short)) + box(b"free", b"\xff" * 64)
    assert declared_video_size(data) is None
