"""The Llama-layout language models: Llama (InternVL2-40B, -Llama3-76B), Qwen2 (-1B), Phi-3 (-4B).

Reference: transformers 4.44.2 `modeling_llama.py` / `modeling_qwen2.py` and upstream InternVL's own
`internvl_chat/internvl/model/phi3/modeling_phi3.py` (commit 74126371, run under transformers 4.37.2).
They share the module tree below `language_model.`:

    model.embed_tokens, model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
    post_attention_layernorm, mlp.{gate,up,down}_proj}, model.norm, lm_head

and differ only in what this file spells out per class: Qwen2's q/k/v biases; Llama's optional
`attention_bias`/`mlp_bias` and its RoPE variants (dynamic, llama3); Phi-3's fused `qkv_proj`
([q | k | v] rows) and `gate_up_proj` ([gate | up] rows), split into the plain projections as they are
read (`from_checkpoint`), and its long-context RoPE. With `tie_word_embeddings` the logits use the
embedding matrix and the checkpoint holds no `lm_head.weight` (one that is there anyway is ignored,
as transformers' weight tying ignores it).
"""

from __future__ import annotations

import re

import torch.nn.functional as F
from torch import Tensor, nn

from services.common.model_config import LLMConfig

from .base import CausalLM, DecoderStack
from .layers import DecoderLayer, GatedMLP, RMSNorm, RotaryAttention
from .rope import LongRopeEmbedding, PlainRotaryEmbedding, RotaryEmbedding, llama_rotary


class SelfAttention(RotaryAttention):
    """Separate q/k/v/o projections (`qkv_bias`: q, k, v; `o_bias`: o)."""

    def __init__(self, cfg: LLMConfig, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size)
        h, d = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=o_bias)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        return (
            self.q_proj(x).view(b, t, self.num_heads, self.head_dim),
            self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim),
            self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim),
        )

    def out(self, x: Tensor) -> Tensor:
        return self.o_proj(x)


class LlamaDecoderLayer(DecoderLayer):
    def __init__(self, cfg: LLMConfig, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg, qkv_bias, o_bias)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    attn = property(lambda self: self.self_attn)
    attn_norm = property(lambda self: self.input_layernorm)
    mlp_norm = property(lambda self: self.post_attention_layernorm)


class LlamaModel(DecoderStack):
    def __init__(self, cfg: LLMConfig, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, qkv_bias, o_bias, mlp_bias) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """transformers' LlamaForCausalLM (4.44.2). Subclasses change biases, RoPE and checkpoint fusions."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__(cfg)
        qkv_bias, o_bias, mlp_bias = self.biases(cfg)
        self.model = LlamaModel(cfg, qkv_bias, o_bias, mlp_bias)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = self.make_rotary(cfg)

    def biases(self, cfg: LLMConfig) -> tuple[bool, bool, bool]:
        """(q/k/v, o, MLP) biases."""
        return cfg.attention_bias, cfg.attention_bias, cfg.mlp_bias

    def make_rotary(self, cfg: LLMConfig) -> RotaryEmbedding:
        return llama_rotary(cfg)

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    def logits(self, h: Tensor) -> Tensor:
        if self.lm_head is None:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)

    def rope_seq_len(self, position_ids: Tensor, kv_seq_len: int) -> int:
        # transformers derives a scaled RoPE's length from the positions: max(position_ids) + 1.
        if self.rotary.seq_len_limit is None:
            return kv_seq_len
        return int(position_ids.max()) + 1

    def from_checkpoint(self, name: str, tensor: Tensor) -> dict[str, Tensor]:
        if self.lm_head is None and name == "lm_head.weight":
            return {}
        return {name: tensor}


class Qwen2ForCausalLM(LlamaForCausalLM):
    """transformers' Qwen2ForCausalLM (4.44.2): q/k/v biases, no o/MLP biases, plain RoPE."""

    def biases(self, cfg: LLMConfig) -> tuple[bool, bool, bool]:
        return True, False, False

    def make_rotary(self, cfg: LLMConfig) -> RotaryEmbedding:
        return PlainRotaryEmbedding(cfg)


_PHI3_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn\.)qkv_proj\.weight$")
_PHI3_GATE_UP = re.compile(r"^(model\.layers\.\d+\.mlp\.)gate_up_proj\.weight$")


class Phi3ForCausalLM(LlamaForCausalLM):
    """Upstream InternVL's Phi-3 (Phi-3-mini-128k): no biases, fused projections in the checkpoint,
    long-context RoPE (`su`/`longrope`; plain RoPE without rope_scaling)."""

    def biases(self, cfg: LLMConfig) -> tuple[bool, bool, bool]:
        return False, False, False

    def make_rotary(self, cfg: LLMConfig) -> RotaryEmbedding:
        return LongRopeEmbedding(cfg) if cfg.rope_scaling is not None else PlainRotaryEmbedding(cfg)

    def _qkv_rows(self) -> list[int]:
        cfg = self.config
        return [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2

    def from_checkpoint(self, name: str, tensor: Tensor) -> dict[str, Tensor]:
        if m := _PHI3_QKV.match(name):
            q, k, v = tensor.split(self._qkv_rows(), dim=0)
            return {f"{m[1]}q_proj.weight": q, f"{m[1]}k_proj.weight": k, f"{m[1]}v_proj.weight": v}
        if m := _PHI3_GATE_UP.match(name):
            gate, up = tensor.chunk(2, dim=0)
            return {f"{m[1]}gate_proj.weight": gate, f"{m[1]}up_proj.weight": up}
        return super().from_checkpoint(name, tensor)

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().checkpoint_shapes()
        out: dict[str, tuple[int, ...]] = {}
        for name, shape in shapes.items():
            if name.endswith("self_attn.q_proj.weight"):
                prefix = name.removesuffix("q_proj.weight")
                out[prefix + "qkv_proj.weight"] = (sum(self._qkv_rows()), shape[1])
            elif name.endswith("mlp.gate_proj.weight"):
                out[name.removesuffix("gate_proj.weight") + "gate_up_proj.weight"] = (2 * shape[0], shape[1])
            elif not name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")):
                out[name] = shape
        return out
