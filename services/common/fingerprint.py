"""A short, stable id for "this checkpoint computed in this dtype", without reading the weights.

The id is part of every feature-cache key (see DESIGN.md), so two different models, or one model
served in two dtypes, never share cached embeddings. Hashing 16 GB of weights at every start would
take minutes, so the id covers what identifies a checkpoint cheaply:

- `config.json` (architecture, tiling defaults);
- for each `*.safetensors` file: its name, size and JSON header (every tensor's name, dtype, shape
  and byte offsets);
- a sparse sample of each file's tensor bytes (a few KiB at evenly spaced offsets): two fine-tunes
  of one architecture have identical headers and sizes, and the sample tells them apart;
- the compute dtype name;
- the weight quantisation, when there is one (int8 weights compute different logits and KV, so an
  int8 decoder's id differs from the same checkpoint's unquantised one).

Torch-free, so the gateway or tools can compute it too.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import BinaryIO

from services.common.quantization import NO_QUANTIZATION

FINGERPRINT_VERSION = b"internvl-fingerprint-v1"
FINGERPRINT_HEX_CHARS = 16  # 64 bits: ample to tell apart the handful of models one deployment serves

# safetensors: 8-byte little-endian header length, then that many bytes of JSON, then tensor data.
_HEADER_LEN_BYTES = 8
# A real safetensors header is at most a few MiB; anything larger means the file is not safetensors.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_SAMPLES_PER_FILE = 16
_SAMPLE_BYTES = 4096


class FingerprintError(RuntimeError):
    """The directory cannot be fingerprinted (no config.json, or a malformed safetensors file)."""


def model_fingerprint(model_dir: str | os.PathLike, dtype_name: str, quantization: str = NO_QUANTIZATION) -> str:
    """Hex id of the checkpoint in `model_dir` computed in `dtype_name` (e.g. "bf16").

    Pass the canonical dtype name the service reports (the same model in "bf16" and "fp32" gives
    different embeddings, hence different ids), and the weight quantisation ("none", "int8"); "none"
    leaves the id exactly what it was before quantisation existed.
    """
    root = Path(model_dir)
    config = root / "config.json"
    if not config.is_file():
        raise FingerprintError(f"{root} has no config.json")
    h = hashlib.sha256()
    update_hash(h, FINGERPRINT_VERSION)
    update_hash(h, config.read_bytes())
    weights = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not weights:
        raise FingerprintError(f"{root} has no *.safetensors files")
    for path in weights:
        update_hash(h, path.name.encode())
        _hash_safetensors(h, path)
    update_hash(h, dtype_name.encode())
    if quantization != NO_QUANTIZATION:
        update_hash(h, b"weights:" + quantization.encode())
    return h.hexdigest()[:FINGERPRINT_HEX_CHARS]


def update_hash(h: hashlib._Hash, data: bytes) -> None:
    """Length-prefixed, so field boundaries cannot shift between inputs."""
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def read_safetensors_header(f: BinaryIO, path: Path, size: int) -> tuple[bytes, int]:
    """(raw JSON header, offset where the tensor data starts) of an open safetensors file."""
    raw_len = f.read(_HEADER_LEN_BYTES)
    if len(raw_len) != _HEADER_LEN_BYTES:
        raise FingerprintError(f"{path.name} is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw_len)
    data_start = _HEADER_LEN_BYTES + header_len
    if header_len > _MAX_HEADER_BYTES or data_start > size:
        raise FingerprintError(f"{path.name} has an invalid safetensors header length {header_len}")
    return f.read(header_len), data_start


def _hash_safetensors(h: hashlib._Hash, path: Path) -> None:
    size = path.stat().st_size
    h.update(struct.pack("<Q", size))
    with path.open("rb") as f:
        header, data_start = read_safetensors_header(f, path, size)
        update_hash(h, header)
        data_len = size - data_start
        step = max(data_len // _SAMPLES_PER_FILE, 1)
        for offset in range(data_start, size, step):
            f.seek(offset)
            update_hash(h, f.read(_SAMPLE_BYTES))
