"""What InternVL2 checkpoints need in GPU memory, as the markdown table of docs/models.md.

    python -m services.tools.member_sizes tests/fixtures/real_configs/*.json   # the seven published members
    python -m services.tools.member_sizes /models/InternVL2-40B                # a checkpoint directory

Reads only config.json (no weights): each model is built on the meta device and its weights counted the
way the services count them at start (services/common/fit.py). The GPU columns give the smallest GPU
class in `GPU_CLASSES` where the need fits with the services' defaults (`--max-model-len`,
`--gpu-memory-utilization`, `--max-batch-tiles`, the engine's activation reserve).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.fit import DeviceMemory, GiB, MemberNeeds, Need, usable_bytes
from services.common.model_config import InternVLConfig
from services.common.quantization import INT8, NO_QUANTIZATION
from services.language_decoder.config import DecoderConfig
from services.language_decoder.engine import EngineConfig
from services.language_decoder.footprint import language_weights
from services.vision_encoder.config import EncoderConfig
from services.vision_encoder.footprint import vision_parameters

MiB = 1 << 20
# Total memory as `nvidia-smi` / torch.cuda.mem_get_info report it for one card of each class.
GPU_CLASSES = (
    ("24 GB (L4, RTX 4090)", 23_034 * MiB),
    ("48 GB (L40S, RTX 6000 Ada)", 46_068 * MiB),
    ("80 GB (A100, H100)", 81_559 * MiB),
    ("141 GB (H200)", 143_771 * MiB),
)
# What a CUDA context takes of the card before a process allocates anything (an estimate; per process).
CUDA_CONTEXT_BYTES = 512 * MiB


@dataclass(frozen=True)
class Defaults:
    """The services' default settings the table assumes."""

    max_model_len: int = DecoderConfig.max_model_len
    gpu_memory_utilization: float = DecoderConfig.gpu_memory_utilization
    activation_reserve: int = EngineConfig.gpu_activation_reserve_bytes
    max_batch_tiles: int = EncoderConfig.max_batch_tiles


def member_needs(name: str, cfg: InternVLConfig) -> MemberNeeds:
    return MemberNeeds(name, cfg.vision, vision_parameters(cfg), cfg.llm, language_weights(cfg.llm))


def gpu(name: str, total: int, processes: int, utilization: float) -> DeviceMemory:
    free = total - processes * CUDA_CONTEXT_BYTES
    return DeviceMemory(name, free, total, usable_bytes(free, total, utilization),
                        f"{processes} CUDA context(s), --gpu-memory-utilization {utilization:g}")


def smallest_gpu(need: Need, processes: int, utilization: float) -> str | None:
    """The first GPU class in `GPU_CLASSES` that holds `need`, or None."""
    for name, total in GPU_CLASSES:
        if need.fits(gpu(name, total, processes, utilization)):
            return name
    return None


def decoder_alone(member: MemberNeeds, quantize: str, d: Defaults) -> Need:
    return member.decoder_need(quantize, d.max_model_len, d.activation_reserve)


def one_gpu(member: MemberNeeds, quantize: str, d: Defaults) -> Need:
    return member.one_gpu_need(quantize, d.max_model_len, d.activation_reserve, d.max_batch_tiles)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _kib(n: int) -> str:
    return f"{n // 1024} KiB"


def table(members: Sequence[MemberNeeds], d: Defaults = Defaults()) -> str:
    """The markdown table: parameters, weights (bf16, int8), KV cache, smallest GPU per deployment."""
    u = d.gpu_memory_utilization
    head = ("| member | parameters | vision weights (bf16) | LLM weights bf16 | LLM weights int8 | KV per token "
            f"(bf16) | KV per {d.max_model_len // 1024}k sequence | one GPU, bf16 | one GPU, int8 "
            "| decoder's own GPU, bf16 | decoder's own GPU, int8 |")
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for m in members:
        fits = [
            smallest_gpu(need, processes, u) or "none"
            for need, processes in (
                (one_gpu(m, NO_QUANTIZATION, d), 2), (one_gpu(m, INT8, d), 2),
                (decoder_alone(m, NO_QUANTIZATION, d), 1), (decoder_alone(m, INT8, d), 1),
            )
        ]
        cells = [m.name, f"{m.parameters / 1e9:.2f}B", _gb(m.vision_bytes()), _gb(m.language_bytes(NO_QUANTIZATION)),
                 _gb(m.language_bytes(INT8)), _kib(m.kv_bytes_per_token()),
                 f"{m.kv_bytes_per_token() * d.max_model_len / GiB:.2f} GiB", *fits]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def load(path: Path) -> tuple[str, InternVLConfig]:
    """(name, config) of a checkpoint directory or a config.json-format file (its `_name` or file stem)."""
    file = path / "config.json" if path.is_dir() else path
    raw = json.loads(file.read_text(encoding="utf-8"))
    name = raw.get("_name") or (path.name if path.is_dir() else path.stem)
    return name, InternVLConfig.from_dict(raw)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.tools.member_sizes", description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="+", type=Path, help="checkpoint directories or config.json files")
    args = parser.parse_args(argv)
    members = [member_needs(*load(p)) for p in args.configs]
    print(table(sorted(members, key=lambda m: m.parameters)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
