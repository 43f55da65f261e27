"""InternLM2 (InternVL2-2B, -8B, -26B): the architecture as upstream writes it.

Reference: `internvl_chat/internvl/model/internlm2/modeling_internlm2.py` in OpenGVLab/InternVL at
commit 74126371 (eager attention path). The module tree mirrors the checkpoint below
`language_model.`, so weights load by name with no remapping:

    model.tok_embeddings, model.layers.N.{attention.wqkv, attention.wo, attention_norm,
    feed_forward.{w1,w2,w3}, ffn_norm}, model.norm, output

The fused `wqkv` stays fused: its rows are grouped per KV head (`split_wqkv`), which is also how a
tensor-parallel split would cut it (whole KV groups per device). RoPE: `rope.RotaryEmbedding`
(dynamic NTK), with the key length of the forward (left padding included) as upstream's `kv_seq_len`.
"""

from __future__ import annotations

from torch import Tensor, nn

from services.common.model_config import LLMConfig

from .base import CausalLM, DecoderStack
from .layers import DecoderLayer, RMSNorm, RotaryAttention, check_silu, swiglu
from .rope import RotaryEmbedding


def split_wqkv(
    qkv: Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Split the fused projection [B, T, (H + 2*H_kv) * D] into q [B,T,H,D], k and v [B,T,H_kv,D].

    Upstream packs the rows per KV group, not as [q | k | v]: for each kv head g, its
    H/H_kv query heads, then its key head, then its value head (einops `b q (h gs d)`,
    gs = H/H_kv + 2). Query head h*gs_q + i therefore belongs to kv head h, which is the
    grouping `repeat_kv`/SDPA's GQA assume.
    """
    b, t, _ = qkv.shape
    group = num_heads // num_kv_heads
    qkv = qkv.view(b, t, num_kv_heads, group + 2, head_dim)
    q = qkv[:, :, :, :group].reshape(b, t, num_heads, head_dim)
    return q, qkv[:, :, :, group], qkv[:, :, :, group + 1]


class FeedForward(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        check_silu(cfg.hidden_act)
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.w1, self.w3, self.w2)


class Attention(RotaryAttention):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size)
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.bias)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return split_wqkv(self.wqkv(x), self.num_heads, self.num_kv_heads, self.head_dim)

    def out(self, x: Tensor) -> Tensor:
        return self.wo(x)


class InternLM2DecoderLayer(DecoderLayer):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    attn = property(lambda self: self.attention)
    attn_norm = property(lambda self: self.attention_norm)
    mlp = property(lambda self: self.feed_forward)
    mlp_norm = property(lambda self: self.ffn_norm)


class InternLM2Model(DecoderStack):
    """The transformer body (`language_model.model.*`)."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class InternLM2ForCausalLM(CausalLM):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__(cfg)
        if cfg.tie_word_embeddings:
            raise ValueError("InternLM2 checkpoints have their own `output` head; tie_word_embeddings must be false")
        self.model = InternLM2Model(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)  # no weights; `inv_freq` is a non-persistent buffer

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def logits(self, h: Tensor) -> Tensor:
        return self.output(h)
