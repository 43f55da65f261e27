"""What a service says it serves: the checkpoint's name, its InternVL2 family member, and (encoder)
the identity of its vision tower.

The family member is read off the architecture, not the directory name (a renamed or fine-tuned
copy is still the member it was built as): the language model's class and size and the vision
tower's width, as the published `config.json`s give them. Anything else (tiny test checkpoints,
other widths) is "custom".

`vision_fingerprint` covers exactly what the encoder computes (InternViT + mlp1, their config, the
image size and dtype): the feature cache keys on it, so two deployments share cached features only
when their encoders would compute the same ones. It is computed like `model_fingerprint` (headers
and sparse byte samples, never the whole weights), over the vision tensors alone. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePath

from services.common.checkpoint import VISION_PREFIXES
from services.common.fingerprint import (
    FINGERPRINT_HEX_CHARS,
    FingerprintError,
    read_safetensors_header,
    update_hash,
)

CUSTOM_MEMBER = "custom"
VISION_FINGERPRINT_VERSION = b"internvl-vision-fingerprint-v1"
_SAMPLE_BYTES = 1024  # per vision tensor: its first bytes (tells fine-tunes apart; headers tell shapes)

# (language model class, its hidden size, its layers, vision tower width) -> member
_MEMBERS = {
    ("Qwen2ForCausalLM", 896, 24, 1024): "InternVL2-1B",
    ("InternLM2ForCausalLM", 2048, 24, 1024): "InternVL2-2B",
    ("Phi3ForCausalLM", 3072, 32, 1024): "InternVL2-4B",
    ("InternLM2ForCausalLM", 4096, 32, 1024): "InternVL2-8B",
    ("InternLM2ForCausalLM", 6144, 48, 3200): "InternVL2-26B",
    ("LlamaForCausalLM", 7168, 60, 3200): "InternVL2-40B",
    ("LlamaForCausalLM", 8192, 80, 3200): "InternVL2-Llama3-76B",
}


def model_name(model: str) -> str:
    """The checkpoint's name: its directory's (or Hub repo's) last part."""
    return PurePath(model.rstrip("/")).name


def family_member(config: dict) -> str:
    """The published member whose architecture a checkpoint's `config.json` (parsed) describes."""
    llm = config.get("llm_config", {})
    arch = (llm.get("architectures") or [""])[0]
    vision_width = config.get("vision_config", {}).get("hidden_size")
    key = (arch, llm.get("hidden_size"), llm.get("num_hidden_layers"), vision_width)
    return _MEMBERS.get(key, CUSTOM_MEMBER)


def family_member_of_dir(model_dir: str | os.PathLike) -> str:
    with (Path(model_dir) / "config.json").open(encoding="utf-8") as f:
        return family_member(json.load(f))


def vision_fingerprint(model_dir: str | os.PathLike, dtype_name: str) -> str:
    """Hex id of the vision tower + projector in `model_dir` computed in `dtype_name`."""
    root = Path(model_dir)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FingerprintError(f"{root} has no config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # What shapes the features besides the weights: the tower's config and the projector's geometry.
    vision_facts = {k: config.get(k) for k in ("downsample_ratio", "ps_version", "select_layer", "force_image_size")}
    vision_facts["vision_config"] = config.get("vision_config")
    h = hashlib.sha256()
    update_hash(h, VISION_FINGERPRINT_VERSION)
    update_hash(h, json.dumps(vision_facts, sort_keys=True).encode())
    weights = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not weights:
        raise FingerprintError(f"{root} has no *.safetensors files")
    tensors = []
    for path in weights:
        tensors += _vision_tensors(path)
    if not tensors:
        raise FingerprintError(f"{root} has no vision tensors ({', '.join(VISION_PREFIXES)}*)")
    # By tensor name, not by file: the same tower sharded differently is the same tower.
    for name, entry, sample in sorted(tensors):
        update_hash(h, name.encode())
        update_hash(h, entry)
        update_hash(h, sample)
    update_hash(h, dtype_name.encode())
    return h.hexdigest()[:FINGERPRINT_HEX_CHARS]


def _vision_tensors(path: Path) -> list[tuple[str, bytes, bytes]]:
    """(name, dtype+shape, first bytes) of each vision tensor in one safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_header, data_start = read_safetensors_header(f, path, size)
        header = json.loads(raw_header)
        found = []
        for name, meta in header.items():
            if not name.startswith(VISION_PREFIXES):
                continue
            begin, end = meta["data_offsets"]
            f.seek(data_start + begin)
            sample = f.read(min(_SAMPLE_BYTES, end - begin))
            found.append((name, json.dumps([meta["dtype"], meta["shape"]]).encode(), sample))
        return found
