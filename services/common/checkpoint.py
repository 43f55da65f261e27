"""Reading an InternVL2 checkpoint directory as it is published on the Hugging Face Hub.

The layout is `config.json`, `model.safetensors` or `model-0000k-of-0000n.safetensors` shards with
`model.safetensors.index.json`, and the tokenizer files. The upstream `.py` files are never
imported. Each service loads only its own half: the encoder reads `vision_model.*` and `mlp1.*`,
the decoder reads `language_model.*`; with sharded checkpoints, shards holding none of a half's
tensors are never opened.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

VISION_PREFIXES = ("vision_model.", "mlp1.")
LLM_PREFIXES = ("language_model.",)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Everything a serving process needs; the upstream *.py files are deliberately left out. Tokenizer files:
# tokenizer.model (SentencePiece: InternLM2, Phi-3), vocab.json + merges.txt (Qwen2), tokenizer.json.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt"]


class CheckpointError(RuntimeError):
    """The checkpoint is missing, incomplete or does not fit the model being built."""


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a Hub repo id (e.g. `OpenGVLab/InternVL2-8B`) fetched once."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; is it an InternVL2 checkpoint directory?")
        return path
    if path.exists() or str(model).startswith((".", "/")) or str(model).count("/") != 1:
        raise CheckpointError(f"model {str(model)!r} is neither a checkpoint directory nor a Hub repo id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(model), allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as exc:  # hub errors come in many types (offline, 404, auth)
        raise CheckpointError(
            f"could not fetch {model!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Without network access, download the checkpoint elsewhere and pass its directory."
        ) from exc


def tensor_index(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        with index.open(encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def load_tensors(
    model_dir: Path,
    prefixes: Iterable[str],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    strip: str = "",
    progress: bool = True,
    convert: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Load the tensors whose names start with one of `prefixes`, converted to `dtype` on `device`.

    `strip` is removed from the front of every returned name, so a half's module can keep
    upstream's names below its root (e.g. strip `language_model.`). `convert(name, tensor)`, when
    given, replaces the cast to `dtype`: it gets each tensor as stored, right after it is read, and
    returns the tensors to keep for it (quantisation turns one weight into int8 values + scales, so
    the unconverted model is never held whole).
    """
    prefixes = tuple(prefixes)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in tensor_index(model_dir).items():
        if name.startswith(prefixes):
            by_file[file].append(name)
    if not by_file:
        raise CheckpointError(f"{model_dir} holds no tensors under {', '.join(prefixes)}")

    tensors: dict[str, torch.Tensor] = {}
    files = sorted(by_file)
    for file in tqdm(files, desc=f"loading {prefixes[0].rstrip('.')}", unit="shard", disable=not progress):
        if not file.is_file():
            raise CheckpointError(f"shard {file.name} listed in {INDEX_FILE} is missing")
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in by_file[file]:
                key = name[len(strip) :] if strip and name.startswith(strip) else name
                if convert is None:
                    tensors[key] = f.get_tensor(name).to(dtype)
                else:
                    tensors.update(convert(key, f.get_tensor(name)))
    return tensors


def assign_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Load `tensors` into a module built on the meta device, insisting on an exact name match."""
    expected = set(module.state_dict())
    missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or extra:
        raise CheckpointError(
            f"{what}: checkpoint does not match the model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''} ({len(extra)})"
        )
    for name, param in module.state_dict().items():
        if tuple(param.shape) != tuple(tensors[name].shape):
            raise CheckpointError(
                f"{what}: {name} has shape {tuple(tensors[name].shape)} in the checkpoint, "
                f"the model expects {tuple(param.shape)}"
            )
    module.load_state_dict(tensors, strict=True, assign=True)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on accelerators (as the checkpoint is stored), fp32 on CPU (exact parity, fast matmuls)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def parse_dtype(name: str | None, device: torch.device | str) -> torch.dtype:
    if not name or name == "auto":
        return default_dtype(device)
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(table)}")
    return table[name]
