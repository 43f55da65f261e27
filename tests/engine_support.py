"""Shared helpers for the decoder-engine tests: a tiny random InternLM2 and output collection."""

from __future__ import annotations

import torch

from services.common.model_config import LLMConfig, RopeScaling
from services.language_decoder.engine import EngineConfig, EngineOutput, EngineRequest, LLMEngine
from services.language_decoder.generate import generate
from services.language_decoder.model import InternLM2ForCausalLM

VOCAB = 97
IMG_CTX = 96  # plays <IMG_CONTEXT> in tiny-model tests


def tiny_model(seed: int = 0, max_position_embeddings: int = 4096, **overrides) -> InternLM2ForCausalLM:
    cfg = LLMConfig(
        **{
            **dict(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                rope_scaling=RopeScaling("dynamic", 2.0), max_position_embeddings=max_position_embeddings,
            ),
            **overrides,
        }
    )
    torch.manual_seed(seed)
    model = InternLM2ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger embeddings: peaked logits, so greedy ties are far away
        model.model.tok_embeddings.weight.mul_(4.0)
    return model


def tiny_engine(model: InternLM2ForCausalLM | None = None, **config) -> LLMEngine:
    defaults = dict(block_size=4, num_kv_blocks=512, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256)
    return LLMEngine(model or tiny_model(), EngineConfig(**{**defaults, **config}))


def token_ids(outputs: list[EngineOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def reference_greedy(
    model: InternLM2ForCausalLM,
    prompt: list[int],
    max_new_tokens: int,
    eos: int = -1,
    image_embeds: torch.Tensor | None = None,
) -> list[int]:
    """The simple static-cache loop of `generate.py`, one prompt alone, cut after `eos`."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        embeds = model.embed(ids, image_embeds, IMG_CTX if image_embeds is not None else None)
        out = generate(model, embeds, torch.ones_like(ids), max_new_tokens=max_new_tokens, eos_token_id=eos,
                       pad_token_id=2).token_ids[0]
    return out[: out.index(eos) + 1] if eos in out else out


def random_prompt(gen: torch.Generator, lo: int, hi: int) -> list[int]:
    n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    return torch.randint(3, IMG_CTX, (n,), generator=gen).tolist()


def request(rid: str, prompt: list[int], **sampling) -> EngineRequest:
    from services.language_decoder.engine import SamplingParams

    return EngineRequest(rid, prompt, SamplingParams(**sampling))
