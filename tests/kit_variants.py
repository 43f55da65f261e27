"""Variants of a parity kit that its upstream goldens still hold for.

A new kit may differ from `dev` in everything the manifest schema leaves open: image ids and file
names, how many images there are, the order of images and cases, sharded weights, pixel-value files
stored as float16. `build_variant` makes such a kit from an existing one without recomputing any
golden, so the test suite can be run on it (`PARITY_KIT=<dir> make test`) and
tests/parity/test_kit_variants.py can check that no test or kit reader depends on `dev`'s content:

- every image (and the video) gets a new id and new file names, unrelated to the old ones;
- extra images are added under new ids, copies of the kit's images (PNGs re-encoded losslessly, so
  their bytes and hashes differ while their pixels, tiles and goldens are the same), until the kit
  has more images than one request may carry;
- the weights are re-saved as shards with a `model.safetensors.index.json`, as the Hub writes them,
  and the manifest's `weights` lists the files;
- pixel-value files are stored as float16 with `pixel_values_dtype` saying so, and the multi-tile
  image with the most tiles gets one too;
- images, cases, vision features and tokenizer cases are listed in another order;
- `images[].sha256` and the `files` table are recomputed.

    python -m tests.kit_variants OUT_DIR [--source KIT_DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open

from gateway.config import GatewayConfig
from services.common.checkpoint import INDEX_FILE, tensor_index
from services.tools.make_tiny_checkpoint import save_weights
from services.vision_encoder.config import EncoderConfig

MANIFEST = "manifest.json"
# One request to the gateway or the encoder carries at most this many images; the variant has more.
PER_REQUEST_IMAGE_LIMIT = max(GatewayConfig.max_images_per_request, EncoderConfig.max_images_per_request)
SHARDS = 3


def renamed_id(old: str) -> str:
    """An id that shares nothing with the old one (no `img`, no index, another sort order)."""
    return "pic_" + hashlib.sha256(old.encode()).hexdigest()[:6]


def _renamed(rel: str, old: str, new: str) -> str:
    """`rel` with every path component named after `old` (`img0`, `img0_800x600.png`) renamed."""
    parts = []
    for part in rel.split("/"):
        if part == old:
            part = new
        elif part.startswith((old + "_", old + ".")):
            part = new + part[len(old):]
        parts.append(part)
    return "/".join(parts)


def _rename_files(root: Path, manifest: dict, old: str, new: str) -> None:
    """Move every kit file named after `old`, and point every manifest string at the new path."""
    moves = {rel: _renamed(rel, old, new) for rel in manifest["files"] if _renamed(rel, old, new) != rel}
    for src, dst in moves.items():
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        (root / src).rename(root / dst)

    def walk(node):
        if isinstance(node, dict):
            return {moves.get(k, k) if node is manifest["files"] else k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return moves.get(node, node) if isinstance(node, str) else node

    manifest.update(walk(manifest))
    for emptied in sorted({(root / src).parent for src in moves}, key=lambda p: -len(p.parts)):
        if emptied.is_dir() and not any(emptied.iterdir()):
            emptied.rmdir()


def _rename_key(node, old: str, new: str):
    """Dicts keyed by image id (e.g. `numerics.*.vision_features_max_abs_diff`) follow the rename."""
    if isinstance(node, dict):
        return {(new if k == old else k): _rename_key(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_rename_key(v, old, new) for v in node]
    return node


def _rename_ids(root: Path, manifest: dict) -> None:
    for k in range(len(manifest["images"])):
        old = manifest["images"][k]["id"]
        new = renamed_id(old)
        _rename_files(root, manifest, old, new)  # replaces the manifest's lists: index them afresh
        manifest["images"][k]["id"] = new
        if "numerics" in manifest:
            manifest["numerics"] = _rename_key(manifest["numerics"], old, new)
        for features in manifest.get("vision_features", []):
            if features["image"] == old:
                features["image"] = new
        for case in manifest["chat_cases"]:
            case["inputs"]["images"] = [new if i == old else i for i in case["inputs"]["images"]]
    video = manifest.get("video")
    if video and "id" in video:
        old, new = video["id"], renamed_id(video["id"])
        _rename_files(root, manifest, old, new)
        manifest["video"]["id"] = new


def _copy_image_file(src: Path, dst: Path, tag: str) -> None:
    """The same decoded pixels in other bytes, so no content cache takes the copy for the original."""
    data = src.read_bytes()
    if data.startswith(b"\x89PNG"):  # re-encoded losslessly
        with Image.open(src) as im:
            im.load()
            buf = io.BytesIO()
            im.save(buf, format="PNG", compress_level=1)
        dst.write_bytes(buf.getvalue())
    elif data.startswith(b"\xff\xd8"):  # a JPEG comment (COM) segment after SOI: decoders skip it
        comment = tag.encode()
        dst.write_bytes(data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:])
    else:
        raise ValueError(f"{src}: only PNG and JPEG images can be copied into a variant")


def _add_copies(root: Path, manifest: dict, total: int) -> None:
    """Copies of the kit's images under new ids until the kit lists `total` images."""
    originals = list(manifest["images"])
    k = 0
    while len(manifest["images"]) < total:
        source = originals[k % len(originals)]
        new = f"copy{k:02d}_of_{source['id']}"
        image = json.loads(json.dumps(source))
        image["id"] = new
        image["file"] = f"images/{new}{Path(source['file']).suffix}"
        _copy_image_file(root / source["file"], root / image["file"], new)
        image["sha256"] = hashlib.sha256((root / image["file"]).read_bytes()).hexdigest()
        image["tiles"] = []
        for tile in source["tiles"]:
            rel = f"preprocess/{new}/{Path(tile).name}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / tile, root / rel)
            image["tiles"].append(rel)
        if source.get("pixel_values_file"):
            rel = f"preprocess/{new}/{Path(source['pixel_values_file']).name}"
            shutil.copyfile(root / source["pixel_values_file"], root / rel)
            image["pixel_values_file"] = rel
        manifest["images"].append(image)
        k += 1


def _shard_weights(root: Path, manifest: dict) -> None:
    tensors = {}
    for name, file in tensor_index(root).items():
        with safe_open(file, framework="pt") as f:
            tensors[name] = f.get_tensor(name)
    listed = manifest["model"]["weights"]
    for rel in [listed] if isinstance(listed, str) else listed:
        (root / rel).unlink()
    manifest["model"]["weights"] = [*save_weights(root, tensors, shards=SHARDS), INDEX_FILE]


def _float16_pixel_files(root: Path, manifest: dict) -> None:
    pre = manifest["preprocess"]
    mean = np.asarray(pre["mean"], np.float32)[:, None, None]
    std = np.asarray(pre["std"], np.float32)[:, None, None]
    multi = [img for img in manifest["images"] if img["num_tiles"] > 1]
    if multi:
        target = max(multi, key=lambda img: img["num_tiles"])
        if not target.get("pixel_values_file"):
            tiles = np.stack([np.asarray(Image.open(root / t).convert("RGB")) for t in target["tiles"]])
            pixel_values = (tiles.transpose(0, 3, 1, 2).astype(np.float32) / 255 - mean) / std
            target["pixel_values_file"] = f"{Path(target['tiles'][0]).parent}/pixel_values.npy"
            np.save(root / target["pixel_values_file"], pixel_values)
    for image in manifest["images"]:
        if image.get("pixel_values_file"):
            path = root / image["pixel_values_file"]
            np.save(path, np.load(path).astype(np.float16))
            image["pixel_values_dtype"] = "float16"


def _reorder(manifest: dict) -> None:
    images = manifest["images"]
    manifest["images"] = images[1::2][::-1] + images[0::2]  # neither the old order nor its reverse
    for key in ("chat_cases", "vision_features", "tokenizer_cases"):
        if key in manifest:
            manifest[key] = manifest[key][::-1]


def _file_table(root: Path) -> dict[str, dict]:
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        data = path.read_bytes()
        table[path.relative_to(root).as_posix()] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return table


def build_variant(source: Path, out: Path, *, images: int = PER_REQUEST_IMAGE_LIMIT + 1) -> Path:
    """Write the variant of the kit at `source` into `out` (created; must not exist); returns `out`."""
    shutil.copytree(source, out)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    _rename_ids(out, manifest)
    _add_copies(out, manifest, images)
    _shard_weights(out, manifest)
    _float16_pixel_files(out, manifest)
    _reorder(manifest)
    manifest["kit"] = f"{manifest['kit']}-variant"
    manifest["files"] = _file_table(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    from tests.conftest import DEFAULT_KIT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="directory to create")
    p.add_argument("--source", type=Path, default=DEFAULT_KIT, help="the kit to derive from (default: dev)")
    p.add_argument("--images", type=int, default=PER_REQUEST_IMAGE_LIMIT + 1, help="images in the variant")
    a = p.parse_args(argv)
    print(build_variant(a.source, a.out, images=a.images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
