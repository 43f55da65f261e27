"""The causal-LM body every architecture shares: embeddings with image rows, the layer stack, the head.

Subclasses (models/internlm2.py, models/llama.py) build their modules under their checkpoint's names
and say which module is the token embedding (`embedding`) and how hidden states become logits
(`logits`: an output head, or the embedding matrix when the config ties them). How checkpoint tensors
become module tensors (`from_checkpoint`) and back (`checkpoint_shapes`) is the identity unless an
architecture fuses projections in its files (Phi-3).

Built on the meta device and filled with `assign=True` (gpt-fast style), so loading never allocates
random weights first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from services.common.model_config import LLMConfig

from .layers import AttentionContext, KVCache, build_attention_mask
from .rope import RotaryEmbedding


class DecoderStack(nn.Module):
    """The transformer body below `language_model.model.`: subclasses add the token embedding."""

    layers: nn.ModuleList
    norm: nn.Module

    def forward(self, h: Tensor, ctx: AttentionContext) -> Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, ctx, i)
        return self.norm(h)


class CausalLM(nn.Module):
    """What the generation loop and the serving engine use: `config`, `device`, `dtype`, `rotary`,
    `embed`/`embed_rows`, `forward`/`forward_flat`, `new_kv_cache`, and `model.layers`."""

    model: DecoderStack
    rotary: RotaryEmbedding

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.config = cfg

    @property
    def embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def logits(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoint names

    def from_checkpoint(self, name: str, tensor: Tensor) -> dict[str, Tensor]:
        """The module tensors one checkpoint tensor (`language_model.` stripped) becomes."""
        return {name: tensor}

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor the checkpoint must hold below `language_model.`."""
        return {name: tuple(t.shape) for name, t in self.state_dict().items()}

    # ------------------------------------------------------------------ properties

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def new_kv_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        cfg = self.config
        return KVCache(
            cfg.num_hidden_layers, batch_size, max_seq_len, cfg.num_key_value_heads, cfg.head_dim,
            dtype=self.dtype, device=self.device,
        )

    # ------------------------------------------------------------------ forward

    def embed(
        self, input_ids: Tensor, image_embeds: Tensor | None = None, img_context_id: int | None = None
    ) -> Tensor:
        """Token embeddings with every `<IMG_CONTEXT>` position replaced by the next visual row.

        `image_embeds` [n_ctx, hidden] (any leading shape is flattened) holds the projected vision
        features in prompt order; across a batch, rows are consumed in row-major order of
        `input_ids`, as upstream's flattened assignment does.
        """
        if img_context_id is None:
            if image_embeds is not None:
                raise ValueError("image_embeds given without img_context_id")
            return self.embed_rows(input_ids)
        index = (input_ids == img_context_id).reshape(-1).nonzero().squeeze(1)
        rows = image_embeds.reshape(-1, self.config.hidden_size) if image_embeds is not None else None
        n_rows = 0 if rows is None else rows.shape[0]
        if index.numel() != n_rows:
            raise ValueError(
                f"prompt has {index.numel()} <IMG_CONTEXT> tokens but {n_rows} image embedding rows were given"
            )
        return self.embed_rows(input_ids, rows if n_rows else None, index)

    def embed_rows(
        self, input_ids: Tensor, image_rows: Tensor | None = None, image_index: Tensor | None = None
    ) -> Tensor:
        """Token embeddings of `input_ids` (any shape) with `image_rows` [n, hidden] written at the
        flattened positions `image_index` [n] (long, on the model's device): where image features
        enter the language model, for the reference loop (`embed`) and the engine's packed steps."""
        embeds = self.embedding(input_ids)
        if image_rows is not None:
            rows = image_rows.to(device=embeds.device, dtype=embeds.dtype, non_blocking=True)
            embeds.view(-1, embeds.shape[-1]).index_copy_(0, image_index, rows)
        return embeds

    def forward(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor,
        kv_cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (float32) for `inputs_embeds` [B, T, H] at RoPE positions `position_ids` [B, T].

        With `kv_cache`, the new tokens occupy slots [kv_cache.seq_len, +T) after the cached ones.
        `attention_mask` [B, past + T] marks real tokens (1) vs left padding (0), as in HF; None
        means no padding. `last_only` returns [B, 1, V] (prefill for generation needs no more, and
        [T, V] logits of a long multimodal prompt would be large).
        """
        b, t, _ = inputs_embeds.shape
        past = kv_cache.seq_len if kv_cache is not None else 0
        if position_ids.shape != (b, t):
            raise ValueError(f"position_ids must be {(b, t)}, got {tuple(position_ids.shape)}")
        mask, is_causal = build_attention_mask(attention_mask, t, past, inputs_embeds.device)
        cos, sin = self.rotary(position_ids, self.rope_seq_len(position_ids, past + t), inputs_embeds.dtype)
        h = self.model(inputs_embeds, AttentionContext(cos, sin, mask, is_causal, kv_cache))
        if kv_cache is not None:
            kv_cache.advance(t)
        if last_only:
            h = h[:, -1:]
        return self.logits(h).float()

    def rope_seq_len(self, position_ids: Tensor, kv_seq_len: int) -> int:
        """The key length upstream's RoPE sees in one batched forward: the slots (past + new, left
        padding included) for InternLM2's dynamic NTK; Phi-3 overrides it."""
        return kv_seq_len

    def forward_flat(self, inputs_embeds: Tensor, ctx: AttentionContext, logits_indices: Tensor | None) -> Tensor:
        """The serving engine's path: tokens of many sequences packed into one row.

        `inputs_embeds` [N, H]; `ctx.cos`/`ctx.sin` [1, N, head_dim] (each token's RoPE, computed by
        the caller because scaled RoPE depends on each token's own sequence); `ctx.kv` stores
        keys/values and knows which tokens attend to which (see `KVStore`). Returns float32 logits for
        the rows `logits_indices` (all rows when None): [len(logits_indices), V].
        """
        h = self.model(inputs_embeds[None], ctx)[0]
        if logits_indices is not None:
            h = h[logits_indices]
        return self.logits(h).float()


def compile_layers(model: CausalLM, mode: str = "default") -> None:
    """torch.compile each decoder layer (regional compilation: one compiled body serves all layers).

    For GPU decode, where a step is dozens of tiny elementwise kernels per layer around the matmuls;
    Inductor fuses them. Shapes become dynamic after the first new token count, so a few compiles cover
    every batch. The KV store stays eager (`kv_attend`).
    """
    config = torch._dynamo.config
    # Guards differ per KV store class and mask kind; leave room so no layer falls back to eager.
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = max(config.recompile_limit, 64)
    else:  # torch < 2.6
        config.cache_size_limit = max(config.cache_size_limit, 64)
    for layer in model.model.layers:
        layer.compile(mode=mode)
