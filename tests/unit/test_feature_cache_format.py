"""Feature-cache keys and the binary value format (no Redis needed)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib

import pytest

from gateway.feature_cache import (
    HEADER_FIXED_BYTES,
    KEY_PREFIX,
    Entry,
    EntryFormatError,
    decode_entry,
    encode_entry,
    feature_key,
    feature_key_for_hash,
    file_sha256,
    video_frame_key,
    video_frame_key_for_hash,
)
from internvl.v1 import tensor_pb2

BF16, FP32 = tensor_pb2.DTYPE_BFLOAT16, tensor_pb2.DTYPE_FLOAT32
SETTINGS = dict(max_tiles=12, min_tiles=1, use_thumbnail=True, image_size=448, model_fingerprint="fp-a")
VIDEO = dict(frame_index=0, num_segments=8, start_seconds=None, end_seconds=None, max_tiles=1, min_tiles=1,
             use_thumbnail=True, image_size=448, model_fingerprint="fp-a")


def make_entry(tiles: int = 2, tokens: int = 4, hidden: int = 8, dtype: int = BF16) -> Entry:
    itemsize = 2 if dtype == BF16 else 4
    payload = os.urandom(tiles * tokens * hidden * itemsize)
    return Entry(dtype, (tiles, tokens, hidden), payload)


def test_same_inputs_give_the_same_namespaced_key():
    a = feature_key(b"image", **SETTINGS)
    assert a == feature_key(b"image", **SETTINGS)
    assert a.startswith(KEY_PREFIX) and len(a) == len(KEY_PREFIX) + 64
    assert a == feature_key_for_hash(file_sha256(b"image"), **SETTINGS)


@pytest.mark.parametrize("change", [
    {"max_tiles": 6}, {"min_tiles": 2}, {"use_thumbnail": False}, {"image_size": 224},
    {"model_fingerprint": "fp-b"},
])
def test_every_setting_and_the_model_change_the_key(change):
    assert feature_key(b"image", **SETTINGS) != feature_key(b"image", **{**SETTINGS, **change})


def test_different_bytes_give_different_keys():
    assert feature_key(b"image", **SETTINGS) != feature_key(b"imagf", **SETTINGS)


@pytest.mark.parametrize(("bad", "message"), [
    ({"model_fingerprint": ""}, "model_fingerprint is required: it keeps different models' features apart"),
    ({"max_tiles": 0}, "need 1 <= min_tiles <= max_tiles, got min=1 max=0"),
    ({"min_tiles": 0}, "need 1 <= min_tiles <= max_tiles, got min=0 max=12"),
    ({"min_tiles": 13}, "need 1 <= min_tiles <= max_tiles, got min=13 max=12"),
    ({"use_thumbnail": None}, "use_thumbnail must be a resolved bool, got None"),
    ({"use_thumbnail": 1}, "use_thumbnail must be a resolved bool, got 1"),
    ({"image_size": 0}, "image_size must be positive, got 0"),
])
def test_unresolved_or_invalid_settings_are_rejected(bad, message):
    with pytest.raises(ValueError) as info:
        feature_key(b"image", **{**SETTINGS, **bad})
    assert str(info.value) == message


@pytest.mark.parametrize("edge", [{"min_tiles": 12}, {"max_tiles": 1}, {"image_size": 1}])
def test_settings_at_their_bounds_are_accepted(edge):
    assert feature_key(b"image", **{**SETTINGS, **edge}).startswith(KEY_PREFIX)


def test_video_frame_keys():
    video = b"video-bytes"
    keys = {video_frame_key(video, **{**VIDEO, "frame_index": i}) for i in range(8)}
    assert len(keys) == 8
    assert video_frame_key(video, **VIDEO) == video_frame_key_for_hash(file_sha256(video), **VIDEO)
    for change in ({"num_segments": 16}, {"start_seconds": 1.5}, {"end_seconds": 3.0}, {"max_tiles": 2},
                   {"model_fingerprint": "fp-b"}):
        assert video_frame_key(video, **VIDEO) != video_frame_key(video, **{**VIDEO, **change})
    # A frame and an image over the same bytes and tiling never share a key.
    image_settings = {k: VIDEO[k] for k in ("max_tiles", "min_tiles", "use_thumbnail", "image_size",
                                            "model_fingerprint")}
    assert video_frame_key(video, **VIDEO) != feature_key(video, **image_settings)
    with pytest.raises(ValueError):
        video_frame_key(video, **{**VIDEO, "frame_index": 8})


def test_key_format_is_pinned():
    """Replicas of different versions share Redis: a change of key derivation (field names, JSON form)
    silently splits their caches, so it must be deliberate and bump KEY_PREFIX along with these values."""
    fingerprint = "0123456789abcdef"
    image = feature_key_for_hash("ab" * 32, max_tiles=12, min_tiles=1, use_thumbnail=True, image_size=448,
                                 model_fingerprint=fingerprint)
    frame = video_frame_key_for_hash("cd" * 32, frame_index=2, num_segments=8, start_seconds=0.5, end_seconds=None,
                                     max_tiles=1, min_tiles=1, use_thumbnail=False, image_size=448,
                                     model_fingerprint=fingerprint)
    assert image == "ivl:feat:v1:2755a07e895a995a0a4c9c7cfa4924a257b350801d2fb9677958e13862d22339"
    assert frame == "ivl:feat:v1:738109c1edacb02f3a84b8e15401321bad56e1dc25f3e3b875ae5b47c0ed0eb1"


def test_key_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="^image_hash must be a sha256 hex digest, got 'xyz'$"):
        feature_key_for_hash("xyz", **SETTINGS)
    with pytest.raises(ValueError, match="^video_hash must be a sha256 hex digest"):
        video_frame_key_for_hash("xyz", **VIDEO)
    with pytest.raises(ValueError, match=r"^need 0 <= frame_index < num_segments, got 8 of 8$"):
        video_frame_key_for_hash(file_sha256(b"v"), **{**VIDEO, "frame_index": 8})
    with pytest.raises(ValueError):  # NaN is no JSON: it would give a key nothing else can match
        video_frame_key_for_hash(file_sha256(b"v"), **{**VIDEO, "start_seconds": float("nan")})
    # One segment is a valid sampling (its frame 0).
    assert video_frame_key_for_hash(file_sha256(b"v"), **{**VIDEO, "num_segments": 1})


def test_key_is_stable_across_processes():
    # Replicas must agree on keys: nothing process-specific (e.g. hash randomization) may leak in.
    code = ("from gateway.feature_cache import feature_key; "
            f"print(feature_key(b'image', **{SETTINGS!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == feature_key(b"image", **SETTINGS)


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_round_trip(dtype):
    entry = make_entry(dtype=dtype)
    raw = encode_entry(entry)
    assert len(raw) == entry.encoded_size == HEADER_FIXED_BYTES + 8 * 3 + entry.nbytes
    back = decode_entry(raw)
    assert back == entry
    assert (back.dtype, back.shape, back.num_tiles, bytes(back.payload)) == (
        dtype, entry.shape, 2, bytes(entry.payload))
    assert back.tensor_header() == entry.tensor_header()
    assert back.tensor_header().byte_length == entry.nbytes


def test_every_corrupted_byte_is_detected():
    raw = encode_entry(make_entry(tiles=1, tokens=2, hidden=3))
    for i in range(len(raw)):
        for flip in (0x01, 0x80):
            damaged = bytearray(raw)
            damaged[i] ^= flip
            with pytest.raises(EntryFormatError):
                decode_entry(bytes(damaged))


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-1], "length"),
    (lambda raw: raw + b"\0", "length"),
    (lambda raw: raw[:10], "truncated"),
    (lambda raw: b"XXXX" + raw[4:], "magic"),
    (lambda raw: raw[:4] + bytes([2]) + raw[5:], "version"),
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "checksum"),
    (lambda raw: b"", "truncated"),
])
def test_damage_gives_a_clear_error(damage, message):
    raw = encode_entry(make_entry())
    with pytest.raises(EntryFormatError, match=message):
        decode_entry(damage(raw))


def test_header_that_lies_consistently_about_the_shape_is_rejected():
    # Re-checksummed but with a shape that does not match the payload size.
    entry = make_entry(tiles=2)
    raw = bytearray(encode_entry(entry))
    struct.pack_into("<q", raw, HEADER_FIXED_BYTES, 3)  # shape[0]: 2 -> 3
    shape_end = HEADER_FIXED_BYTES + 8 * 3
    crc = zlib.crc32(raw[shape_end:], zlib.crc32(raw[HEADER_FIXED_BYTES:shape_end], zlib.crc32(raw[:20])))
    struct.pack_into("<I", raw, 20, crc)
    with pytest.raises(EntryFormatError, match="inconsistent"):
        decode_entry(bytes(raw))


def test_entry_validates_its_payload_size_and_dtype():
    with pytest.raises(ValueError, match="payload"):
        Entry(BF16, (1, 2, 3), b"\0" * 11)
    with pytest.raises(ValueError):
        Entry(tensor_pb2.DTYPE_UNSPECIFIED, (1,), b"\0\0")
    with pytest.raises(ValueError):
        Entry(BF16, (), b"")


def test_decode_does_not_copy_the_payload():
    raw = encode_entry(make_entry())
    assert isinstance(decode_entry(raw).payload, memoryview)


def test_gateway_modules_do_not_import_torch():
    code = ("import sys, gateway.feature_cache, gateway.sessions; "
            "sys.exit('torch imported' if 'torch' in sys.modules else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_scope_is_a_key_space_of_its_own():
    """A tenant's scope (ChatCore.cache_scope) enters the canonical fields as "scope"; none keeps the
    shared keys. Pinned like the unscoped form: replicas of different versions must agree on it."""
    h = "ab" * 32
    plain = feature_key_for_hash(h, **SETTINGS)
    assert feature_key_for_hash(h, **SETTINGS, scope="") == plain
    scoped = {s: feature_key_for_hash(h, **SETTINGS, scope=s) for s in ("tenant-a", "tenant-b")}
    assert len({plain, *scoped.values()}) == 3
    fields = {"kind": "image", "content": h, "max_tiles": 12, "min_tiles": 1, "use_thumbnail": True,
              "image_size": 448, "model": "fp-a", "scope": "tenant-a"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    assert scoped["tenant-a"] == KEY_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()
    frame = video_frame_key_for_hash(h, **VIDEO)
    assert video_frame_key_for_hash(h, **VIDEO, scope="") == frame
    assert len({frame, video_frame_key_for_hash(h, **VIDEO, scope="tenant-a"),
                video_frame_key_for_hash(h, **VIDEO, scope="tenant-b")}) == 3
