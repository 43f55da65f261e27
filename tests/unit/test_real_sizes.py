"""Every InternVL2 member at its real size, built on the meta device (nothing big is allocated).

For each of the seven members, from the published dimensions in tests/fixtures/real_configs/<member>.json:

- the whole model (InternViT + mlp1 + language model), built through the builders the services use,
  has the published parameter count (within 1 %);
- its state_dict is exactly the real checkpoint's tensor set: the tensor names of the parity kit of the
  same architecture (the kits use the real names; only their shapes are tiny), expanded to the real
  depth, with shapes computed here from the real config alone (independently of the serving modules);
- the services' strict loader (`assign_weights`) accepts exactly that set, and refuses it with one
  tensor missing or one too many.

The expected shapes are written per architecture below; which names exist is read from the kits, and
`test_the_kits_names_are_the_architectures` checks the two agree on every kit.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from services.common.checkpoint import CheckpointError, assign_weights
from services.common.known_configs import internvl2_8b_config
from services.common.model_config import InternVLConfig
from services.language_decoder.model import build_language_model
from services.vision_encoder.model import build_vision_encoder
from tests.kits import fixture_kit

REAL_CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "real_configs"
# member -> (kit carrying its vision tensor names, kit carrying its language-model tensor names).
# No kit stands for InternVL2-40B: it is the 26B kit's InternViT-6B with the 76B kit's Llama.
NAME_KITS = {
    "internvl2-1b": ("internvl2-1b", "internvl2-1b"),
    "internvl2-2b": ("dev", "dev"),
    "internvl2-4b": ("internvl2-4b", "internvl2-4b"),
    "internvl2-8b": ("dev", "dev"),
    "internvl2-26b": ("internvl2-26b", "internvl2-26b"),
    "internvl2-40b": ("internvl2-26b", "internvl2-76b"),
    "internvl2-llama3-76b": ("internvl2-76b", "internvl2-76b"),
}
MEMBERS = sorted(NAME_KITS, key=lambda m: json.loads((REAL_CONFIGS / f"{m}.json").read_text())["_published_parameters"])
TOLERANCE = 0.01  # published counts are rounded to 3 significant digits


def raw_config(member: str) -> dict:
    return json.loads((REAL_CONFIGS / f"{member}.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Shapes from the config alone. Keys are tensor names with `{i}` for the layer index.

_VISION_LAYER = "vision_model.encoder.layers.{i}."
_LLM_LAYER = "language_model.model.layers.{i}."


def vision_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    """`vision_model.*` and `mlp1.*` (InternViT-300M and -6B; the flags say which tensors exist)."""
    v, h = raw["vision_config"], raw["llm_config"]["hidden_size"]
    c, f, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    merged = c * round(1 / raw["downsample_ratio"]) ** 2
    layer = _VISION_LAYER
    shapes = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, v["num_channels"], p, p),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "vision_model.embeddings.position_embedding": (1, (v["image_size"] // p) ** 2 + 1, c),
        layer + "attn.qkv.weight": (3 * c, c),
        layer + "attn.proj.weight": (c, c),
        layer + "attn.proj.bias": (c,),
        layer + "ls1": (c,),
        layer + "ls2": (c,),
        layer + "mlp.fc1.weight": (f, c),
        layer + "mlp.fc1.bias": (f,),
        layer + "mlp.fc2.weight": (c, f),
        layer + "mlp.fc2.bias": (c,),
        layer + "norm1.weight": (c,),
        layer + "norm2.weight": (c,),
        "mlp1.0.weight": (merged,),
        "mlp1.0.bias": (merged,),
        "mlp1.1.weight": (h, merged),
        "mlp1.1.bias": (h,),
        "mlp1.3.weight": (h, h),
        "mlp1.3.bias": (h,),
    }
    if v["qkv_bias"]:
        shapes[layer + "attn.qkv.bias"] = (3 * c,)
    if v["qk_normalization"]:  # InternViT-6B: RMSNorm over all heads' q and k
        shapes[layer + "attn.q_norm.weight"] = (c,)
        shapes[layer + "attn.k_norm.weight"] = (c,)
    if v["norm_type"] == "layer_norm":  # RMSNorm has no bias
        shapes[layer + "norm1.bias"] = (c,)
        shapes[layer + "norm2.bias"] = (c,)
    return shapes


def llm_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    """`language_model.*` of the architecture `llm_config.architectures` names."""
    cfg = raw["llm_config"]
    arch = cfg["architectures"][0]
    h, f, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // heads
    q, kv = heads * d, kv_heads * d
    layer = _LLM_LAYER
    if arch == "InternLM2ForCausalLM":
        return {
            "language_model.model.tok_embeddings.weight": (vocab, h),
            "language_model.model.norm.weight": (h,),
            "language_model.output.weight": (vocab, h),
            layer + "attention.wqkv.weight": (q + 2 * kv, h),
            layer + "attention.wo.weight": (h, q),
            layer + "attention_norm.weight": (h,),
            layer + "feed_forward.w1.weight": (f, h),
            layer + "feed_forward.w2.weight": (h, f),
            layer + "feed_forward.w3.weight": (f, h),
            layer + "ffn_norm.weight": (h,),
        }
    # The transformers layout shared by Qwen2, Phi-3 and Llama.
    shapes = {
        "language_model.model.embed_tokens.weight": (vocab, h),
        "language_model.model.norm.weight": (h,),
        "language_model.lm_head.weight": (vocab, h),
        layer + "input_layernorm.weight": (h,),
        layer + "post_attention_layernorm.weight": (h,),
        layer + "self_attn.o_proj.weight": (h, q),
        layer + "mlp.down_proj.weight": (h, f),
    }
    if arch == "Phi3ForCausalLM":  # fused projections
        shapes[layer + "self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
        shapes[layer + "mlp.gate_up_proj.weight"] = (2 * f, h)
        return shapes
    if arch not in ("Qwen2ForCausalLM", "LlamaForCausalLM"):
        raise AssertionError(f"no shape rules for {arch}")
    for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        shapes[layer + f"self_attn.{name}.weight"] = (rows, h)
        if arch == "Qwen2ForCausalLM" or cfg.get("attention_bias"):  # Qwen2: q/k/v biases
            shapes[layer + f"self_attn.{name}.bias"] = (rows,)
    shapes[layer + "mlp.gate_proj.weight"] = (f, h)
    shapes[layer + "mlp.up_proj.weight"] = (f, h)
    return shapes


def formula(raw: dict) -> dict[str, tuple[int, ...]]:
    return {**vision_shapes(raw), **llm_shapes(raw)}


_LAYER_INDEX = re.compile(r"^(vision_model\.encoder\.layers|language_model\.model\.layers)\.(\d+)\.")


def template_of(name: str) -> str:
    return _LAYER_INDEX.sub(lambda m: f"{m.group(1)}.{{i}}.", name)


def expand(templates: dict[str, tuple[int, ...]], raw: dict) -> dict[str, tuple[int, ...]]:
    depth = {_VISION_LAYER: raw["vision_config"]["num_hidden_layers"],
             _LLM_LAYER: raw["llm_config"]["num_hidden_layers"]}
    out = {}
    for name, shape in templates.items():
        prefix = next((p for p in depth if name.startswith(p)), None)
        if prefix is None:
            out[name] = shape
        else:
            out.update({name.format(i=i): shape for i in range(depth[prefix])})
    return out


@cache
def kit_tensors(kit_name: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor a kit stores (one file or shards), from the safetensors headers."""
    shapes = {}
    for file in fixture_kit(kit_name).weight_files():
        with safe_open(file, framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})  # noqa: SIM118
    return shapes


def kit_templates(member: str) -> set[str]:
    """The real checkpoint's tensor names (layer index as `{i}`): vision and mlp1 from one kit, the
    language model from another (the same kit for every member but the 40B)."""
    vision_kit, language_kit = NAME_KITS[member]
    vision = {template_of(n) for n in kit_tensors(vision_kit) if not n.startswith("language_model.")}
    language = {template_of(n) for n in kit_tensors(language_kit) if n.startswith("language_model.")}
    return vision | language


@cache
def real_checkpoint(member: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the member's real checkpoint: the kits' names at the real depth, the real shapes."""
    raw = raw_config(member)
    shapes = formula(raw)
    templates = kit_templates(member)
    assert templates == set(shapes), (
        f"{member}: the kits' tensor names differ from the architecture's: only in the kits "
        f"{sorted(templates - set(shapes))}, only in the formula {sorted(set(shapes) - templates)}")
    return expand(shapes, raw)


@cache
def meta_model(member: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(vision encoder, language model) of the real config, on the meta device, as the services build them."""
    cfg = InternVLConfig.from_dict(raw_config(member))
    with torch.device("meta"):
        return build_vision_encoder(cfg), build_language_model(cfg.llm)


def model_tensors(vision: torch.nn.Module, llm: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensors the two halves' loaders want, under the checkpoint's names (the language model's as
    its checkpoint holds them: Phi-3's fused projections fused, a tied head absent)."""
    shapes = {n: tuple(t.shape) for n, t in vision.state_dict().items()}
    shapes.update({"language_model." + n: s for n, s in llm.checkpoint_shapes().items()})
    return shapes


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kit_name", ["dev", "internvl2-1b", "internvl2-4b", "internvl2-26b", "internvl2-76b"])
def test_the_kits_names_are_the_architectures(kit_name):
    """The shape rules above reproduce each kit's own file (names and shapes) from the kit's config."""
    raw = json.loads(fixture_kit(kit_name).path("config.json").read_text(encoding="utf-8"))
    assert kit_tensors(kit_name) == expand(formula(raw), raw)


@pytest.mark.parametrize("member", MEMBERS)
def test_parameter_count_is_the_published_one(member):
    published = raw_config(member)["_published_parameters"]
    vision, llm = meta_model(member)
    count = sum(t.numel() for t in vision.state_dict().values()) + sum(t.numel() for t in llm.state_dict().values())
    assert abs(count / published - 1) <= TOLERANCE, f"{member}: {count:,} parameters, published {published:,}"
    assert count == sum(torch.Size(s).numel() for s in real_checkpoint(member).values())


@pytest.mark.parametrize("member", MEMBERS)
def test_model_is_exactly_the_real_checkpoint(member):
    expected, model = real_checkpoint(member), model_tensors(*meta_model(member))
    missing, extra = sorted(expected.keys() - model.keys()), sorted(model.keys() - expected.keys())
    assert not missing and not extra, (
        f"{member}: the checkpoint has {len(missing)} tensors the model lacks {missing[:4]}, the model wants "
        f"{len(extra)} the checkpoint lacks {extra[:4]}")
    wrong = {n: (model[n], s) for n, s in expected.items() if model[n] != s}
    assert not wrong, f"{member}: (model, checkpoint) shapes differ: {dict(list(wrong.items())[:4])}"


def _meta_tensors(shapes: dict[str, tuple[int, ...]], prefix: str, strip: bool) -> dict[str, torch.Tensor]:
    picked = {n: s for n, s in shapes.items() if n.startswith(prefix) == strip}
    return {(n[len(prefix):] if strip else n): torch.empty(s, dtype=torch.bfloat16, device="meta")
            for n, s in picked.items()}


def _as_loaded(llm: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors mapped to the model's own names, as load_language_model maps them while reading."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        out.update(llm.from_checkpoint(name, tensor))
    return out


@pytest.mark.parametrize("member", MEMBERS)
def test_loader_accepts_exactly_the_real_tensors(member):
    shapes = real_checkpoint(member)
    cfg = InternVLConfig.from_dict(raw_config(member))
    prefix = "language_model."

    def halves():
        with torch.device("meta"):
            return build_vision_encoder(cfg), build_language_model(cfg.llm)

    vision, llm = halves()
    assign_weights(vision, _meta_tensors(shapes, prefix, strip=False), "vision encoder")
    assign_weights(llm, _as_loaded(llm, _meta_tensors(shapes, prefix, strip=True)), "language model")
    assert model_tensors(vision, llm) == shapes

    tensors = _meta_tensors(shapes, prefix, strip=True)
    dropped = sorted(tensors)[len(tensors) // 2]
    del tensors[dropped]
    llm = halves()[1]
    wanted_after_drop = set(_as_loaded(llm, {dropped: _meta_tensors(shapes, prefix, strip=True)[dropped]}))
    with pytest.raises(CheckpointError, match=re.escape(sorted(wanted_after_drop)[0])):
        assign_weights(llm, _as_loaded(llm, tensors), "language model")
    tensors = _meta_tensors(shapes, prefix, strip=True) | {"model.layers.999.extra.weight": torch.empty(1)}
    llm = halves()[1]
    with pytest.raises(CheckpointError, match=r"unexpected \['model\.layers\.999\.extra\.weight'\]"):
        assign_weights(llm, _as_loaded(llm, tensors), "language model")


def test_the_8b_file_is_the_known_config():
    """The 8B data file and services/common/known_configs.py (the benchmarks' source) say the same."""
    assert InternVLConfig.from_dict(raw_config("internvl2-8b")) == internvl2_8b_config()


def test_nothing_was_allocated():
    for member in ("internvl2-2b", "internvl2-26b"):
        vision, llm = meta_model(member)
        assert all(t.is_meta for t in [*vision.state_dict().values(), *llm.state_dict().values()])
