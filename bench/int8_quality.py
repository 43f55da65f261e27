"""Quality of int8 decoder weights against a parity kit's upstream fp32 goldens (default: the dev kit copy).

For every chat case of the kit, the language model is loaded with `quantize="int8"` (weights quantised as
the checkpoint is read, activations in `--dtype`, fp32 by default) and compared with upstream's fp32 run:

- `match`: greedy tokens equal to upstream's until the first divergence, per case (in a batch case, the
  shortest row's count), out of the tokens upstream generated;
- `max_abs` and `cosine`: the last prompt position's logits against upstream's (worst row of a batch);
- `upstream bf16`: for scale, the kit's own record of upstream's bf16 run against its fp32 run (max abs
  difference of the same logits, and where its greedy tokens first diverged).

Image embeddings come from this repository's vision encoder in fp32 (parity-tested against upstream to
1e-4), so only the decoder's weights differ from the goldens. Run:

    .venv/bin/python bench/int8_quality.py [--kit DIR] [--dtype fp32|bf16] [--json PATH]

`tests/parity/test_int8_quality.py` asserts bounds derived from these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.checkpoint import parse_dtype  # noqa: E402
from services.common.quantization import INT8  # noqa: E402
from services.language_decoder.generate import generate  # noqa: E402
from services.language_decoder.model import InternLM2ForCausalLM, load_language_model, position_ids_from_mask  # noqa: E402

DEFAULT_KIT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity" / "dev"


@dataclass(frozen=True)
class CaseQuality:
    case: str
    matched_tokens: int  # greedy tokens equal to upstream's before the first divergence (worst row)
    upstream_tokens: int  # tokens upstream generated (shortest row)
    last_logits_max_abs: float  # vs upstream fp32, worst row
    last_logits_cosine: float  # vs upstream fp32, worst row
    upstream_bf16_max_abs: float | None  # the kit's upstream bf16 vs fp32 record, for scale
    upstream_bf16_divergence: int | None  # step where upstream bf16's tokens left fp32's (None: never)


class Kit:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))

    def npy(self, rel: str) -> np.ndarray:
        return np.load(self.root / rel)


def image_features(kit: Kit, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """extract_feature output per image id of the kit (video frames included), from the kit's tile PNGs."""
    from services.vision_encoder.model import load_vision_encoder

    encoder = load_vision_encoder(kit.root, device="cpu", dtype=torch.float32)
    pre = kit.manifest["preprocess"]
    mean, std = np.asarray(pre["mean"], dtype=np.float32), np.asarray(pre["std"], dtype=np.float32)
    tiles = {img["id"]: img["tiles"] for img in kit.manifest["images"]}
    tiles["video"] = kit.manifest["video"]["tiles"]
    out = {}
    for image_id, files in tiles.items():
        arr = np.stack([np.asarray(Image.open(kit.root / t).convert("RGB")) for t in files])
        pixels = (arr.astype(np.float32) / np.float32(255) - mean) / std  # the manifest's formula
        pixel_values = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
        with torch.inference_mode():
            out[image_id] = encoder.extract_feature(pixel_values)
    return {k: v.to(dtype) for k, v in out.items()}


def matched_prefix(actual: list[int], expected: list[int]) -> int:
    n = 0
    for a, e in zip(actual, expected, strict=False):
        if a != e:
            break
        n += 1
    return n


def measure_case(kit: Kit, lm: InternLM2ForCausalLM, case: dict, features: dict[str, torch.Tensor]) -> CaseQuality:
    exp, kwargs = case["expected"], case["inputs"]["effective_generate_kwargs"]
    ids = torch.from_numpy(kit.npy(exp["input_ids_file"])).long()
    mask = torch.from_numpy(kit.npy(exp["attention_mask_file"])).long()
    images = case["inputs"]["images"]
    embeds_in = torch.cat([features[i] for i in images]).reshape(-1, lm.config.hidden_size) if images else None
    ctx_id = kit.manifest["special_token_ids"]["<IMG_CONTEXT>"] if images else None
    with torch.inference_mode():
        embeds = lm.embed(ids, embeds_in, ctx_id)
        last = lm(embeds, position_ids_from_mask(mask), attention_mask=mask, last_only=True)[:, -1].float()
        out = generate(lm, embeds, mask, max_new_tokens=kwargs["max_new_tokens"], eos_token_id=kwargs["eos_token_id"],
                       pad_token_id=kwargs["pad_token_id"], do_sample=False,
                       repetition_penalty=kwargs.get("repetition_penalty", 1.0))
    golden = torch.from_numpy(kit.npy(exp["last_logits_file"])).float()
    bf16 = kit.manifest.get("numerics", {}).get("bf16_vs_fp32", {}).get(case["id"], {})
    divergence = bf16.get("first_divergence_batch_step")
    return CaseQuality(
        case=case["id"],
        matched_tokens=min(matched_prefix(a, e) for a, e in zip(out.token_ids, exp["generated_ids"], strict=True)),
        upstream_tokens=min(len(e) for e in exp["generated_ids"]),
        last_logits_max_abs=float((last - golden).abs().max()),
        last_logits_cosine=float(torch.nn.functional.cosine_similarity(last, golden, dim=-1).min()),
        upstream_bf16_max_abs=bf16.get("last_logits_max_abs_diff_vs_fp32"),
        upstream_bf16_divergence=None if not divergence else divergence[1],
    )


def measure(kit_root: Path = DEFAULT_KIT, dtype: torch.dtype = torch.float32) -> list[CaseQuality]:
    kit = Kit(kit_root)
    lm = load_language_model(kit.root, device="cpu", dtype=dtype, quantize=INT8)
    cases = kit.manifest["chat_cases"]
    features = image_features(kit, dtype) if any(c["inputs"]["images"] for c in cases) else {}
    return [measure_case(kit, lm, case, features) for case in cases]


def table(rows: list[CaseQuality]) -> str:
    lines = ["| case | greedy tokens = upstream | last logits max abs | cosine | upstream bf16: max abs, diverges at |",
             "|---|---|---|---|---|"]
    for r in rows:
        ref = "-" if r.upstream_bf16_max_abs is None else f"{r.upstream_bf16_max_abs:.3f}, " + (
            "never" if r.upstream_bf16_divergence is None else f"step {r.upstream_bf16_divergence}")
        lines.append(f"| {r.case} | {r.matched_tokens} / {r.upstream_tokens} | {r.last_logits_max_abs:.4f} | "
                     f"{r.last_logits_cosine:.6f} | {ref} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kit", type=Path, default=Path(os.environ.get("PARITY_KIT", DEFAULT_KIT)))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="compute dtype of the int8 model")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = measure(args.kit, parse_dtype(args.dtype, "cpu"))
    print(f"int8 weights, {args.dtype} activations, vs upstream fp32 ({args.kit}):")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
