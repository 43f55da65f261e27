"""The serving modules at the real InternVL2-8B size, built on the meta device (nothing big is allocated).

Checks the parameter count against a formula derived here from the config, and that the model's
state_dict is exactly the real checkpoint's tensor set: the parity kit's tensor names expanded to 24
vision and 32 LLM layers, with shapes computed from the real config facts.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from services.common.checkpoint import CheckpointError, assign_weights
from services.common.known_configs import internvl2_8b_config
from services.common.model_config import InternVLConfig, LLMConfig, RopeScaling, VisionConfig
from services.language_decoder.model import build_language_model
from services.vision_encoder.model import build_vision_encoder
from tests.conftest import DEFAULT_KIT, Kit

# Exact counts the formula below gives for InternVL2-8B (model card: ~8B = InternViT-300M + MLP + 7.7B).
INTERNVIT_PARAMS = 304_012_288
MLP1_PARAMS = 33_570_816
VISION_HALF_PARAMS = INTERNVIT_PARAMS + MLP1_PARAMS  # 337,583,104
LLM_PARAMS = 7_737_782_272
TOTAL_PARAMS = VISION_HALF_PARAMS + LLM_PARAMS  # 8,075,365,376


@pytest.fixture(scope="module")
def cfg() -> InternVLConfig:
    return internvl2_8b_config()


@pytest.fixture(scope="module")
def vision(cfg):
    with torch.device("meta"):
        return build_vision_encoder(cfg)


@pytest.fixture(scope="module")
def llm(cfg):
    with torch.device("meta"):
        return build_language_model(cfg.llm)


def test_config_is_the_published_one(cfg):
    assert cfg.vision == VisionConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        image_size=448, patch_size=14, num_channels=3, layer_norm_eps=1e-6, qkv_bias=True,
        qk_normalization=False, norm_type="layer_norm", hidden_act="gelu",
    )
    assert cfg.llm == LLMConfig(
        vocab_size=92553, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
        rope_scaling=RopeScaling(type="dynamic", factor=2.0), max_position_embeddings=32768,
        bias=False, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    assert (cfg.downsample_ratio, cfg.ps_version, cfg.select_layer) == (0.5, "v2", -1)
    assert cfg.force_image_size == 448
    assert cfg.template == "internlm2-chat"
    assert (cfg.min_dynamic_patch, cfg.max_dynamic_patch, cfg.use_thumbnail) == (1, 12, True)
    assert cfg.num_image_token == 256
    assert cfg.llm.head_dim == 128 and cfg.vision.head_dim == 64
    # it survives the config.json round trip the services use
    assert InternVLConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------
# Shapes of every checkpoint tensor, from the config alone (independent of the serving modules).


def vision_shapes(cfg: InternVLConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of `vision_model.*` / `mlp1.*` tensors, keyed by the name with the layer index as `{i}`."""
    v, h = cfg.vision, cfg.llm.hidden_size
    c, f, p = v.hidden_size, v.intermediate_size, v.patch_size
    merged = c * int(1 / cfg.downsample_ratio) ** 2
    layer = "vision_model.encoder.layers.{i}."
    shapes = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, v.num_channels, p, p),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "vision_model.embeddings.position_embedding": (1, (v.image_size // p) ** 2 + 1, c),
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
        layer + "norm1.bias": (c,),
        layer + "norm2.weight": (c,),
        layer + "norm2.bias": (c,),
        "mlp1.0.weight": (merged,),
        "mlp1.0.bias": (merged,),
        "mlp1.1.weight": (h, merged),
        "mlp1.1.bias": (h,),
        "mlp1.3.weight": (h, h),
        "mlp1.3.bias": (h,),
    }
    if v.qkv_bias:
        shapes[layer + "attn.qkv.bias"] = (3 * c,)
    if v.qk_normalization:  # InternViT-6B style (InternVL2-26B / -76B)
        shapes[layer + "attn.q_norm.weight"] = (c,)
        shapes[layer + "attn.k_norm.weight"] = (c,)
    if v.norm_type == "rms_norm":  # RMSNorm has no bias
        del shapes[layer + "norm1.bias"], shapes[layer + "norm2.bias"]
    return shapes


def llm_shapes(cfg: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of `language_model.*` tensors, keyed like `vision_shapes`."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    layer = "language_model.model.layers.{i}."
    return {
        "language_model.model.tok_embeddings.weight": (cfg.vocab_size, h),
        "language_model.model.norm.weight": (h,),
        "language_model.output.weight": (cfg.vocab_size, h),
        layer + "attention.wqkv.weight": ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d, h),
        layer + "attention.wo.weight": (h, cfg.num_attention_heads * d),
        layer + "attention_norm.weight": (h,),
        layer + "feed_forward.w1.weight": (f, h),
        layer + "feed_forward.w2.weight": (h, f),
        layer + "feed_forward.w3.weight": (f, h),
        layer + "ffn_norm.weight": (h,),
    }


_LAYER = re.compile(r"^(vision_model\.encoder\.layers|language_model\.model\.layers)\.(\d+)\.")


def template_of(name: str) -> str:
    return _LAYER.sub(lambda m: f"{m.group(1)}.{{i}}.", name)


def expand(templates: dict[str, tuple[int, ...]], cfg: InternVLConfig) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, shape in templates.items():
        if name.startswith("vision_model.encoder.layers.{i}."):
            out.update({name.format(i=i): shape for i in range(cfg.vision.num_hidden_layers)})
        elif name.startswith("language_model.model.layers.{i}."):
            out.update({name.format(i=i): shape for i in range(cfg.llm.num_hidden_layers)})
        else:
            out[name] = shape
    return out


def kit_tensors(kit) -> dict[str, tuple[int, ...]]:
    """Every tensor of the kit's weights, whether one file or shards (`model.weights` lists them)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in kit.weight_files():
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in names})
    return shapes


def test_shape_formula_matches_the_kit(kit):
    """The formula reproduces the kit's own file (names and shapes) from the kit's config."""
    kit_cfg = InternVLConfig.from_dir(kit.root)
    expected = expand({**vision_shapes(kit_cfg), **llm_shapes(kit_cfg.llm)}, kit_cfg)
    assert kit_tensors(kit) == expected


@pytest.fixture(scope="module")
def real_checkpoint_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every tensor of the real checkpoint: kit names expanded to the real depth, real shapes.

    The names come from the repo's dev kit, the InternVL2-8B layout, whatever PARITY_KIT names
    (a family kit, e.g. internvl2-26b, is another architecture).
    """
    templates = {template_of(n) for n in kit_tensors(Kit(DEFAULT_KIT))}
    formula = {**vision_shapes(cfg), **llm_shapes(cfg.llm)}
    assert templates == set(formula), "the kit's tensor set differs from the real architecture's"
    shapes = expand({t: formula[t] for t in templates}, cfg)
    assert sum(n.startswith("vision_model.encoder.layers.") for n in shapes) == 24 * 14
    assert sum(n.startswith("language_model.model.layers.") for n in shapes) == 32 * 7
    return shapes


def _state_shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + name: tuple(t.shape) for name, t in module.state_dict().items()}


def test_state_dicts_are_exactly_the_real_checkpoint(vision, llm, real_checkpoint_shapes):
    model = {**_state_shapes(vision), **_state_shapes(llm, "language_model.")}
    missing = sorted(real_checkpoint_shapes.keys() - model.keys())
    extra = sorted(model.keys() - real_checkpoint_shapes.keys())
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    wrong = {n: (model[n], s) for n, s in real_checkpoint_shapes.items() if model[n] != s}
    assert not wrong
    assert len(model) == 4 + 24 * 14 + 6 + 3 + 32 * 7  # 573 tensors


def test_assign_weights_accepts_the_real_tensor_set(cfg, real_checkpoint_shapes):
    """Meta tensors with the real names and shapes load through the services' strict loader."""
    meta = {n: torch.empty(s, dtype=torch.bfloat16, device="meta") for n, s in real_checkpoint_shapes.items()}
    with torch.device("meta"):
        vision = build_vision_encoder(cfg)
        llm = build_language_model(cfg.llm)
    assign_weights(vision, {n: t for n, t in meta.items() if not n.startswith("language_model.")}, "vision")
    prefix = "language_model."
    assign_weights(llm, {n[len(prefix):]: t for n, t in meta.items() if n.startswith(prefix)}, "llm")
    # assign=True: the modules now hold the given (meta, bf16) tensors, not their own fp32 ones
    loaded = {**_state_shapes(vision), **_state_shapes(llm, prefix)}
    assert loaded == real_checkpoint_shapes
    state = [*vision.state_dict().values(), *llm.state_dict().values()]
    assert all(t.dtype == torch.bfloat16 and t.is_meta for t in state)


def test_assign_weights_rejects_a_wrong_real_shape(cfg, real_checkpoint_shapes):
    prefix = "language_model."
    tensors = {
        n[len(prefix):]: torch.empty(s, dtype=torch.bfloat16, device="meta")
        for n, s in real_checkpoint_shapes.items()
        if n.startswith(prefix)
    }
    # e.g. a checkpoint packed without GQA (32 kv heads): wqkv would be 3*4096 rows, not 6144
    tensors["model.layers.7.attention.wqkv.weight"] = torch.empty(3 * 4096, 4096, device="meta")
    with torch.device("meta"):
        llm = build_language_model(cfg.llm)
    with pytest.raises(CheckpointError, match=r"model\.layers\.7\.attention\.wqkv\.weight.*\(12288, 4096\)"):
        assign_weights(llm, tensors, "language model")


# ---------------------------------------------------------------------------------------------
# Parameter counts


def vision_param_formula(cfg: InternVLConfig) -> tuple[int, int]:
    """(InternViT, mlp1) parameter counts."""
    v, h = cfg.vision, cfg.llm.hidden_size
    c, f, p = v.hidden_size, v.intermediate_size, v.patch_size
    embeddings = c + (c * v.num_channels * p * p + c) + ((v.image_size // p) ** 2 + 1) * c
    attn = (3 * c * c + (3 * c if v.qkv_bias else 0)) + (c * c + c)
    mlp = (f * c + f) + (c * f + c)
    norms_and_scales = 2 * (2 * c) + 2 * c
    vit = embeddings + v.num_hidden_layers * (attn + mlp + norms_and_scales)
    merged = c * int(1 / cfg.downsample_ratio) ** 2
    mlp1 = 2 * merged + (merged * h + h) + (h * h + h)
    return vit, mlp1


def llm_param_formula(cfg: LLMConfig) -> int:
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d * h + cfg.num_attention_heads * d * h
    layer = attn + 3 * f * h + 2 * h
    return 2 * cfg.vocab_size * h + h + cfg.num_hidden_layers * layer


def _count(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


def test_parameter_count(cfg, vision, llm, real_checkpoint_shapes):
    vit, mlp1 = vision_param_formula(cfg)
    n_llm = llm_param_formula(cfg.llm)
    assert (vit, mlp1, n_llm) == (INTERNVIT_PARAMS, MLP1_PARAMS, LLM_PARAMS)

    assert _count(vision.vision_model) == INTERNVIT_PARAMS  # "InternViT-300M"
    assert _count(vision.mlp1) == MLP1_PARAMS
    assert _count(vision) == VISION_HALF_PARAMS
    assert _count(llm) == LLM_PARAMS  # internlm2_5-7b-chat (92553-token vocab)
    assert _count(vision) + _count(llm) == TOTAL_PARAMS
    # every parameter is a checkpoint tensor (no buffers in the state_dicts)
    n_params = sum(p.numel() for p in vision.parameters()) + sum(p.numel() for p in llm.parameters())
    assert n_params == TOTAL_PARAMS
    assert sum(torch.Size(s).numel() for s in real_checkpoint_shapes.values()) == TOTAL_PARAMS
    # ~16.15 GB of bf16 weights, as the Hub repo's model.safetensors.index.json total_size would say
    assert TOTAL_PARAMS * 2 == 16_150_730_752
    assert round(TOTAL_PARAMS / 1e9, 2) == 8.08 and round(VISION_HALF_PARAMS / 1e9, 2) == 0.34
    assert round(LLM_PARAMS / 1e9, 2) == 7.74 and round(INTERNVIT_PARAMS / 1e9, 2) == 0.30


def test_nothing_was_allocated(vision, llm):
    assert all(t.is_meta for t in [*vision.state_dict().values(), *llm.state_dict().values()])
