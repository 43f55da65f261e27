"""The vision half of InternVL2: InternViT-300M, pixel shuffle and the `mlp1` projector.

`VisionEncoder.extract_feature` turns `[n, 3, 448, 448]` tiles into `[n, num_image_token, llm_hidden]`
image embeddings, exactly as upstream `InternVLChatModel.extract_feature` does (pinned commit
`74126371`, `modeling_intern_vit.py` / `modeling_internvl_chat.py`). Module names equal the
checkpoint's tensor names (`vision_model.*`, `mlp1.*`), so the published weights load unchanged.

Hand-written rather than built on `transformers.models.internvl.InternVLVisionModel`: that class does
reproduce the kit (2e-6), but only with transformers 5.x (not a project dependency; ~3 s import plus
regex/tokenizers), a fused-`qkv` split and a rename of every tensor, and its final LayerNorm switched
off through `use_mean_pooling=True`; these ~150 lines load the checkpoint as-is and match it as well.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.common.checkpoint import (
    VISION_PREFIXES,
    assign_weights,
    default_dtype,
    load_tensors,
    parse_dtype,
    resolve_model_dir,
)
from services.common.model_config import InternVLConfig, VisionConfig

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),  # exact erf GELU, as transformers' ACT2FN["gelu"]
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}


class RMSNorm(nn.Module):
    """InternRMSNorm: normalise in float32, cast back, then scale (no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _norm(cfg: VisionConfig, dim: int) -> nn.Module:
    if cfg.norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
    if cfg.norm_type == "rms_norm":
        return RMSNorm(dim, eps=cfg.layer_norm_eps)
    raise ValueError(f"unsupported vision norm_type {cfg.norm_type!r}")


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported vision hidden_act {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c, p = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.image_size // p  # side of the grid the position table was trained for
        self.class_embedding = nn.Parameter(torch.empty(1, 1, c))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, c, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + self.grid * self.grid, c))

    def _patch_positions(self, h: int, w: int) -> torch.Tensor:
        """Upstream `_get_pos_embed`: bicubic resize of the patch table to the h x w grid, in fp32."""
        table = self.position_embedding[:, 1:]
        grid = table.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, h * w).permute(0, 2, 1).to(table.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values)  # [n, C, h, w]
        n, _, h, w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(n, 1, -1).to(dtype), patches], dim=1)
        pos = torch.cat([self.position_embedding[:, :1], self._patch_positions(h, w)], dim=1)
        return x + pos.to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        if cfg.head_dim * cfg.num_attention_heads != c:
            raise ValueError(f"vision hidden_size {c} is not divisible by {cfg.num_attention_heads} heads")
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)  # rows [q | k | v]
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:  # upstream: RMSNorm over all heads, whatever norm_type says
            self.q_norm = RMSNorm(c, eps=cfg.layer_norm_eps)
            self.k_norm = RMSNorm(c, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, c = x.shape
        q, k, v = self.qkv(x).reshape(n, s, 3, self.num_heads, c // self.num_heads).unbind(2)
        if self.qk_normalization:
            q = self.q_norm(q.flatten(-2)).view(q.shape)
            k = self.k_norm(k.flatten(-2)).view(k.shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(n, s, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _activation(cfg.hidden_act)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = _norm(cfg, cfg.hidden_size)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.norm2 = _norm(cfg, cfg.hidden_size)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoderLayers(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class InternViT(nn.Module):
    """InternVisionModel without a final norm; `forward` returns upstream `hidden_states[select_layer]`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoderLayers(cfg)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        layers = self.encoder.layers
        # hidden_states = (embeddings, after layer 0, ..., after layer L-1): L+1 entries.
        depth = select_layer + len(layers) + 1 if select_layer < 0 else select_layer
        if not 0 <= depth <= len(layers):
            raise ValueError(f"select_layer {select_layer} is out of range for {len(layers)} layers")
        x = self.embeddings(pixel_values)
        for layer in layers[:depth]:
            x = layer(x)
        return x  # [n, 1 + h*w, C], CLS first


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, version: str = "v2") -> torch.Tensor:
    """Upstream `InternVLChatModel.pixel_shuffle`: [n, w, h, c] -> [n, w*s, h*s, c/s^2] (s=0.5: 2x2 merge).

    `v1` keeps upstream's transposed layout (H and W swapped); `v2` transposes back.
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"unknown ps_version {version!r}")
    n, w, h, c = x.shape
    hs, ws, cs = h * scale_factor, w * scale_factor, c / (scale_factor * scale_factor)
    if not all(float(v).is_integer() for v in (hs, ws, c / scale_factor, cs)):
        raise ValueError(f"pixel_shuffle: grid {w}x{h}x{c} does not divide by scale {scale_factor}")
    x = x.reshape(n, w, int(hs), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(hs), int(ws), int(cs))
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


class VisionEncoder(nn.Module):
    """InternViT + pixel shuffle + `mlp1`, named like the checkpoint below its root."""

    def __init__(self, cfg: InternVLConfig):
        super().__init__()
        self.config = cfg
        self.downsample_ratio = cfg.downsample_ratio
        self.ps_version = cfg.ps_version
        self.select_layer = cfg.select_layer
        self.num_image_token = cfg.num_image_token
        vit_hidden, llm_hidden = cfg.vision.hidden_size, cfg.llm.hidden_size
        merged = vit_hidden * int(1 / cfg.downsample_ratio) ** 2
        self.vision_model = InternViT(cfg.vision)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(merged),  # upstream keeps nn.LayerNorm's default eps (1e-5) here
            nn.Linear(merged, llm_hidden),
            nn.GELU(),
            nn.Linear(llm_hidden, llm_hidden),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp1[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mlp1[1].weight.device

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] normalised tiles -> [n, num_image_token, llm_hidden] image embeddings."""
        x = self.vision_model(pixel_values.to(self.dtype), self.select_layer)
        x = x[:, 1:]  # drop CLS
        n, tokens, c = x.shape
        side = math.isqrt(tokens)
        x = pixel_shuffle(x.reshape(n, side, side, c), self.downsample_ratio, self.ps_version)
        return self.mlp1(x.reshape(n, -1, x.shape[-1]))

    forward = extract_feature


def build_vision_encoder(cfg: InternVLConfig) -> VisionEncoder:
    """Plain constructor; build it under `torch.device("meta")` and load with `assign_weights`."""
    return VisionEncoder(cfg)


def load_vision_encoder(
    model_dir: str | os.PathLike | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> VisionEncoder:
    """Build the encoder on the meta device and fill it with the checkpoint's `vision_model.*`/`mlp1.*`.

    `dtype` defaults to bf16 on accelerators and fp32 on CPU. `language_model.*` is never read.
    """
    root = resolve_model_dir(model_dir)
    cfg = InternVLConfig.from_dir(root)
    if dtype is None:
        dtype = default_dtype(device)
    elif isinstance(dtype, str):
        dtype = parse_dtype(dtype, device)
    with torch.device("meta"):
        encoder = build_vision_encoder(cfg)
    tensors = load_tensors(root, VISION_PREFIXES, dtype=dtype, device=device)
    assign_weights(encoder, tensors, "vision encoder")
    return encoder.eval().requires_grad_(False)
