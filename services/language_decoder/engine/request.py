"""The engine's public request and output types."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from services.common.limits import sampling_problem


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, with Hugging Face `generate` semantics (as upstream `chat()`).

    Greedy unless `do_sample` (a `temperature` of 0 also means greedy). The repetition penalty sees the
    generated tokens only, never the prompt: upstream generates from `inputs_embeds`, so HF's running
    `input_ids` holds just the new tokens. A stop token id ends the sequence and is kept in the output
    ids (as upstream's `generated_ids` keep `<|im_end|>`); a stop string ends it on the detokenized text,
    which is cut before the stop string. `seed` fixes this request's random stream, whatever else runs
    in the same batch; without it the request draws from the engine's shared, randomly seeded stream.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        problem = sampling_problem(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                   repetition_penalty=self.repetition_penalty, stop=tuple(self.stop))
        if problem:
            raise ValueError(problem)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0


@dataclass(frozen=True)
class EngineRequest:
    """One generation request: a tokenized prompt plus the image embeddings it carries.

    `image_embeds` [n_ctx, hidden] holds the projected vision features of every image in prompt order;
    `image_spans[i]` = (start, end) is the half-open range of prompt positions whose `<IMG_CONTEXT>`
    tokens take image i's rows (spans are ordered and their lengths sum to n_ctx; `find_image_spans`
    finds them). `image_hashes[i]` identifies image i's content for prefix reuse (e.g. the sha256 of
    the image bytes + tiling settings); two images with the same token span but different hashes never
    share KV. Hashes may be omitted: the embedding bytes are hashed instead. `cache_salt` (one per
    tenant, from the gateway) keeps one salt's prompts from ever reusing another's KV.

    `held_images` are images sent without rows (`image_embeds` holds the others' rows only): their
    KV is pinned by `prefix_hold` (from `LLMEngine.hold_prefix` for the same prompt), which the engine
    takes over when the request is queued and releases when it finishes.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    image_embeds: Tensor | None = None
    image_spans: Sequence[tuple[int, int]] = ()
    image_hashes: Sequence[str | bytes] = ()
    cache_salt: bytes = b""  # seeds the prefix-cache hash chain: different salts never share KV
    held_images: Sequence[int] = ()
    prefix_hold: PrefixHold | None = None


@dataclass(eq=False)
class PrefixHold:
    """Pinned prefix-cache blocks of a prompt, and which of its images they cover completely.

    Made by `LLMEngine.hold_prefix`; given back with `release_hold` unless a request took it over
    (`taken`).
    """

    blocks: list[int]
    held_images: tuple[int, ...]
    cached_tokens: int
    taken: bool = False
    released: bool = False


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class EngineOutput:
    """What one step produced for one request: the new token ids and the text they completed.

    `text` is a delta: concatenating every output's `text` gives the whole response. The last output
    has `finished=True`, a `finish_reason` ("stop", "length", "abort" or "error") and `usage`.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


def find_image_spans(prompt_token_ids: Sequence[int], img_context_id: int) -> list[tuple[int, int]]:
    """The maximal runs of `img_context_id` in a prompt, one per `<img>...</img>` block, in order."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, tok in enumerate(prompt_token_ids):
        if tok == img_context_id and start is None:
            start = i
        elif tok != img_context_id and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(prompt_token_ids)))
    return spans


def embedding_digest(tensor: Tensor) -> bytes:
    """sha256 of a tensor's dtype, shape and bytes (the fallback image hash)."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()
