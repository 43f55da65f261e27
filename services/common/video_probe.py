"""A video container's declared frame size, read without decoding (pure: the gateway uses it too).

decord reports no frame size short of decoding a frame, so limits that depend on the frame size (the
pixel cap, the tile count) are first checked on the container's own metadata.
"""

from __future__ import annotations

import struct


def _mp4_boxes(data: bytes | bytearray, start: int, end: int):
    """(type, body start, box end) of each ISO-BMFF box in data[start:end]; stops at a malformed one."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:  # 64-bit size
            if pos + 16 > end:
                return
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:  # to the end of the enclosing box
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _mp4_find(data: bytes | bytearray, start: int, end: int, path: tuple[bytes, ...]):
    """(body start, end) of every box reached by the box-type `path` below data[start:end]."""
    for kind, body, stop in _mp4_boxes(data, start, end):
        if kind == path[0]:
            if len(path) == 1:
                yield body, stop
            else:
                yield from _mp4_find(data, body, stop, path[1:])


def declared_video_size(data: bytes | bytearray) -> tuple[int, int] | None:
    """The largest frame size an MP4/MOV file declares for its video tracks, read without decoding.

    decord reports no frame size short of decoding a frame, so the pixel cap is first checked on the
    container's own metadata: the width and height of each video track's sample entry (`stsd`, e.g.
    `avc1`). None when the data is not ISO-BMFF or declares no video track. A file whose container
    lies is still caught frame by frame as frames are decoded (see `read_video_frames`).
    """
    sizes = []
    for trak, trak_end in _mp4_find(data, 0, len(data), (b"moov", b"trak")):
        # hdlr: version/flags (4), pre_defined (4), then the handler type ('vide' for video).
        handlers = [bytes(data[b + 8 : b + 12]) for b, e in _mp4_find(data, trak, trak_end, (b"mdia", b"hdlr"))]
        if handlers != [b"vide"]:
            continue
        for body, stop in _mp4_find(data, trak, trak_end, (b"mdia", b"minf", b"stbl", b"stsd")):
            # stsd: version/flags (4), entry count (4), then a VisualSampleEntry: size (4), format (4),
            # reserved (6), data_reference_index (2), pre_defined/reserved (16), width (2), height (2).
            if body + 8 + 36 <= stop:
                sizes.append(struct.unpack_from(">HH", data, body + 8 + 32))
    return max(sizes, key=lambda wh: wh[0] * wh[1]) if sizes else None


def damaged_chunk_offsets(data: bytes | bytearray) -> str | None:
    """What is wrong when an MP4/MOV's chunk offset table points outside the file, else None.

    decord (FFmpeg underneath) follows `stco`/`co64` offsets without bounds checks of its own: a file
    whose first chunk offset was set past its end made the decoding process die with SIGSEGV (found by
    the tiling mutation audit's tests). A client's bytes must not be able to kill the encoder, so such a
    container is refused before decord opens it.
    """
    for stbl, stbl_end in _mp4_find(data, 0, len(data), (b"moov", b"trak", b"mdia", b"minf", b"stbl")):
        for kind, body, stop in _mp4_boxes(data, stbl, stbl_end):
            if kind not in (b"stco", b"co64"):
                continue
            width = 4 if kind == b"stco" else 8
            if body + 8 > stop:
                return f"its {kind.decode()} box is truncated"
            (count,) = struct.unpack_from(">I", data, body + 4)  # after version/flags
            if body + 8 + count * width > stop:
                return f"its {kind.decode()} box declares {count} chunk offsets but holds fewer"
            for i in range(count):
                (offset,) = struct.unpack_from(">I" if width == 4 else ">Q", data, body + 8 + i * width)
                if offset >= len(data):
                    return (f"chunk {i} of its {kind.decode()} table starts at byte {offset}, "
                            f"beyond its {len(data)} bytes")
    return None
