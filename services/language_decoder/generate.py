"""A simple in-process generation loop over a static KV cache, matching HF `generate` as upstream used it.

Upstream `InternVLChatModel.chat()/batch_chat()` call `language_model.generate(inputs_embeds=...,
attention_mask=..., eos_token_id=<|im_end|>, pad_token_id=2, ...)` with transformers 4.44. The parts
reproduced here:

- greedy (`do_sample=False`) or multinomial sampling, after HF's processors in HF's order:
  repetition penalty, then temperature, top-k, top-p (`sampling.py`, shared with the engine);
- because generation starts from `inputs_embeds` with no `input_ids`, HF's running `input_ids` holds
  only the generated tokens, so the repetition penalty sees only those (never the prompt);
- a row that emitted an EOS id is finished; it keeps receiving `pad_token_id` while others continue;
- stop when every row is finished or after `max_new_tokens` steps;
- each step appends 1 to the attention mask and the new token's position is cumsum(mask) - 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from services.language_decoder.models import CausalLM
from services.language_decoder.models.layers import position_ids_from_mask
from services.language_decoder.sampling import sample


@dataclass
class GenerationOutput:
    sequences: Tensor  # [B, steps] int64, generated ids only (pad after a row finished)
    finished: list[bool]  # row stopped on an EOS id
    step_logits: Tensor | None = None  # [steps, B, V] float32 raw logits that chose each token

    @property
    def token_ids(self) -> list[list[int]]:
        return self.sequences.tolist()


@torch.inference_mode()
def generate(
    model: CausalLM,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    return_step_logits: bool = False,
) -> GenerationOutput:
    """Generate from a (left-padded) batch of prompt embeddings [B, T, H] with mask [B, T]."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = inputs_embeds.device
    b, t, _ = inputs_embeds.shape
    mask = attention_mask.to(device=device, dtype=torch.long)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    cache = model.new_kv_cache(b, t + max_new_tokens)

    logits = model(inputs_embeds, position_ids_from_mask(mask), cache, mask, last_only=True)[:, -1]
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    tokens: list[Tensor] = []
    step_logits: list[Tensor] = []
    for step in range(max_new_tokens):
        if return_step_logits:
            step_logits.append(logits)
        prev = torch.stack(tokens, dim=1) if tokens else None
        nxt = sample(
            logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, prev_tokens=prev, generator=generator,
        )
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
        tokens.append(nxt)
        unfinished &= ~torch.isin(nxt, eos)
        if step + 1 == max_new_tokens or not bool(unfinished.any()):
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        positions = mask.sum(dim=1, keepdim=True) - 1
        logits = model(model.embed(nxt[:, None]), positions, cache, mask)[:, -1]

    sequences = torch.stack(tokens, dim=1)
    return GenerationOutput(
        sequences=sequences,
        finished=torch.isin(sequences, eos).any(dim=1).tolist(),
        step_logits=torch.stack(step_logits) if return_step_logits else None,
    )
