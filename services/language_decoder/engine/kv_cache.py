"""The paged KV cache: one preallocated tensor, sized once from configuration or free device memory."""

from __future__ import annotations

import torch
from torch import Tensor

from services.common.fit import kv_bytes_per_token, usable_bytes
from services.common.model_config import LLMConfig

from .config import EngineConfig


def bytes_per_block(llm: LLMConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of `block_size` tokens in every layer (128 KiB per token for InternVL2-8B in bf16)."""
    return block_size * kv_bytes_per_token(llm, torch.empty((), dtype=dtype).element_size())


def num_kv_blocks(config: EngineConfig, llm: LLMConfig, dtype: torch.dtype, device: torch.device) -> int:
    """How many blocks to preallocate (see `EngineConfig` for the order of precedence)."""
    per_block = bytes_per_block(llm, config.block_size, dtype)
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    else:
        budget = config.kv_cache_memory_bytes
        if budget is None and device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            # Keep (1 - utilization) of the card for others, plus room for this process's activations.
            budget = usable_bytes(free, total, config.gpu_memory_utilization) - config.gpu_activation_reserve_bytes
        elif budget is None:
            budget = config.cpu_kv_cache_bytes
        blocks = budget // per_block
    if blocks < config.max_blocks_per_seq:
        raise ValueError(
            f"the KV cache holds {blocks} blocks of {config.block_size} tokens, fewer than one sequence of "
            f"max_model_len={config.max_model_len} tokens needs ({config.max_blocks_per_seq}); give it "
            f"more memory ({per_block} bytes per block) or lower max_model_len"
        )
    return int(blocks)


class PagedKVCache:
    """Per layer, K and V as [num_blocks + 1, block_size, H_kv, D].

    Token slot `s` is (block s // block_size, offset s % block_size); `flat()` views a layer as
    [slots, H_kv, D] for writes by slot mapping and gathers by slot table. The extra last block is a
    scratch block no sequence ever owns: padded rows of a captured CUDA graph write and read there.
    """

    def __init__(
        self, llm: LLMConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (2, llm.num_hidden_layers, num_blocks + 1, block_size, llm.num_key_value_heads, llm.head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)  # allocated once, never resized
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks
        self.num_layers = llm.num_hidden_layers
        self._flat = [
            (self.storage[0, i].view(-1, *shape[-2:]), self.storage[1, i].view(-1, *shape[-2:]))
            for i in range(llm.num_hidden_layers)
        ]

    def write(self, layer: int, slot_mapping: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store a step's packed keys/values k, v [1, H_kv, N, D] of `layer` at `slot_mapping` [N].

        Returns the layer's K and V as [slots, H_kv, D] views (see `flat`), new tokens included.
        """
        k_flat, v_flat = self._flat[layer]
        k_flat.index_copy_(0, slot_mapping, k[0].transpose(0, 1))
        v_flat.index_copy_(0, slot_mapping, v[0].transpose(0, 1))
        return k_flat, v_flat

    def block_tables(
        self, tables: list[list[int]], width: int, num_rows: int | None = None, dtype: torch.dtype = torch.long
    ) -> Tensor:
        """Block tables as one [num_rows, width] host tensor, each row cut or padded to `width` with
        the scratch block; rows past `len(tables)` (a CUDA graph's padded batch) are all scratch."""
        pad = self.scratch_block
        rows = [t[:width] + [pad] * (width - len(t)) for t in tables]
        rows += [[pad] * width] * ((num_rows or len(tables)) - len(tables))
        return torch.tensor(rows, dtype=dtype)

    def flat(self, layer: int) -> tuple[Tensor, Tensor]:
        """K and V of `layer` as [slots, H_kv, D] views."""
        return self._flat[layer]

    def blocks(self, layer: int) -> tuple[Tensor, Tensor]:
        """K and V of `layer` as [num_blocks + 1, block_size, H_kv, D] (flash-attn's paged layout)."""
        return self.storage[0, layer], self.storage[1, layer]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()
