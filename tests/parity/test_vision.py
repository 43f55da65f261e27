"""Vision half vs the kit's upstream goldens: ViT last hidden state, pixel shuffle output, features."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from services.common.model_config import InternVLConfig
from services.vision_encoder import model as vision
from services.vision_encoder.model import build_vision_encoder, load_vision_encoder, pixel_shuffle
from tests.conftest import Kit, load_kit

VISION_CASES = load_kit().manifest["vision_features"]
DEBUG_CASES = [c for c in VISION_CASES if "debug" in c]


def test_kit_has_vision_goldens() -> None:
    # Guards against the parametrized tests below silently collecting nothing.
    assert VISION_CASES and DEBUG_CASES


def pixel_values_for(kit: Kit, image_id: str) -> torch.Tensor:
    """The image's exact float32 pixel_values, from its tile PNGs (a `pixel_values_file` may be float16)."""
    pv = torch.from_numpy(kit.pixel_values(image_id))
    assert list(pv.shape) == kit.image(image_id)["pixel_values_shape"]
    return pv


@pytest.fixture(scope="module")
def encoder(kit: Kit) -> vision.VisionEncoder:
    return load_vision_encoder(kit.root, device="cpu", dtype=torch.float32)


def assert_close(actual: torch.Tensor, expected: np.ndarray, tol: dict, what: str) -> float:
    expected_t = torch.from_numpy(expected)
    assert tuple(actual.shape) == tuple(expected_t.shape), what
    diff = (actual.float() - expected_t).abs().max().item()
    torch.testing.assert_close(actual.float(), expected_t, atol=tol["atol"], rtol=tol["rtol"], msg=what)
    return diff


@pytest.mark.parametrize("case", VISION_CASES, ids=[c["image"] for c in VISION_CASES])
def test_extract_feature_matches_upstream(kit: Kit, encoder, case: dict) -> None:
    tol = kit.tolerances["vision_features_fp32"]
    pv = pixel_values_for(kit, case["image"])
    with torch.inference_mode():
        features = encoder.extract_feature(pv)
    assert features.dtype == torch.float32
    assert list(features.shape) == case["shape"]
    assert features.shape[1] == kit.manifest["model"]["num_image_token"] == encoder.num_image_token
    assert_close(features, kit.npy(case["file"]), tol, f"{case['image']} features")


@pytest.mark.parametrize("case", DEBUG_CASES, ids=[c["image"] for c in DEBUG_CASES])
def test_intermediates_match_upstream(kit: Kit, encoder, case: dict) -> None:
    tol = kit.tolerances["vision_features_fp32"]
    debug = case["debug"]
    pv = pixel_values_for(kit, case["image"])
    with torch.inference_mode():
        hidden = encoder.vision_model(pv, encoder.select_layer)
        assert_close(hidden, kit.npy(debug["vit_last_hidden_state"]), tol, "ViT last hidden state")
        patches = hidden[:, 1:]
        n, tokens, c = patches.shape
        side = int(tokens**0.5)
        grid = patches.reshape(n, side, side, c)
        shuffled = pixel_shuffle(grid, encoder.downsample_ratio, encoder.ps_version)
        shuffled = shuffled.reshape(n, -1, shuffled.shape[-1])
        assert_close(shuffled, kit.npy(debug["pixel_shuffle_out"]), tol, "pixel shuffle output")


def test_input_is_cast_to_module_dtype(kit: Kit, encoder) -> None:
    case = VISION_CASES[0]
    pv = pixel_values_for(kit, case["image"])
    with torch.inference_mode():
        features = encoder.extract_feature(pv[:1].double())
    assert features.dtype == torch.float32
    assert_close(features, kit.npy(case["file"])[:1], kit.tolerances["vision_features_fp32"], "float64 input")


def test_loader_never_reads_language_model_tensors(kit: Kit, monkeypatch) -> None:
    from services.common import checkpoint

    read: list[str] = []
    real_safe_open = checkpoint.safe_open

    class SpyHandle:
        def __init__(self, handle):
            self._handle = handle

        def __enter__(self):
            self._handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def keys(self):
            return self._handle.keys()

        def get_tensor(self, name):
            read.append(name)
            return self._handle.get_tensor(name)

        def get_slice(self, name):
            read.append(name)
            return self._handle.get_slice(name)

    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **kw: SpyHandle(real_safe_open(*a, **kw)))
    encoder = load_vision_encoder(kit.root)
    assert read, "the spy saw no tensor reads"
    assert not [n for n in read if n.startswith("language_model.")]
    assert sorted(read) == sorted(encoder.state_dict())
    assert all(n.startswith(("vision_model.", "mlp1.")) for n in read)
    params = list(encoder.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad for p in params)
    assert not encoder.training


def test_bf16_load(kit: Kit) -> None:
    encoder = load_vision_encoder(kit.root, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    case = VISION_CASES[0]
    with torch.inference_mode():
        features = encoder.extract_feature(pixel_values_for(kit, case["image"]))
    assert features.dtype == torch.bfloat16
    diff = (features.float() - torch.from_numpy(kit.npy(case["file"]))).abs().max().item()
    # Informative in the kit; our bf16 run must land in the same range as upstream's own bf16 run.
    assert diff <= 3 * case["bf16_max_abs_diff_vs_fp32"] + 1e-3, diff


def _naive_layer(layer: vision.VisionLayer, x: torch.Tensor) -> torch.Tensor:
    """Upstream's eager `_naive_attn` block, used to check the SDPA path on config variants."""
    attn = layer.attn
    h = layer.norm1(x)
    n, s, c = h.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(h).reshape(n, s, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if attn.qk_normalization:
        q = attn.q_norm(q.transpose(1, 2).flatten(-2)).view(n, s, heads, -1).transpose(1, 2)
        k = attn.k_norm(k.transpose(1, 2).flatten(-2)).view(n, s, heads, -1).transpose(1, 2)
    weights = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    x = x + attn.proj((weights @ v).transpose(1, 2).reshape(n, s, c)) * layer.ls1
    return x + layer.mlp(layer.norm2(x)) * layer.ls2


@pytest.mark.parametrize("norm_type,qk_norm", [("layer_norm", False), ("rms_norm", True)])
def test_sdpa_layer_matches_naive_attention(kit: Kit, norm_type: str, qk_norm: bool) -> None:
    cfg = InternVLConfig.from_dir(kit.root)
    cfg = dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, norm_type=norm_type, qk_normalization=qk_norm)
    )
    torch.manual_seed(0)
    encoder = build_vision_encoder(cfg)
    layer = encoder.vision_model.encoder.layers[0]
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    names = set(layer.state_dict())
    assert ("attn.q_norm.weight" in names) == qk_norm
    assert ("norm1.bias" in names) == (norm_type == "layer_norm")
    x = torch.randn(2, 17, cfg.vision.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), _naive_layer(layer, x), atol=1e-5, rtol=1e-5)


def test_position_embedding_resize_is_identity_at_native_size(kit: Kit, encoder) -> None:
    emb = encoder.vision_model.embeddings
    grid, table = emb.grid, emb.position_embedding
    torch.testing.assert_close(emb._patch_positions(grid, grid), table[:, 1:], atol=0, rtol=0)
    assert emb._patch_positions(grid // 2, grid // 2).shape == (1, (grid // 2) ** 2, table.shape[-1])
