"""One request's state inside the engine: its tokens, image rows, KV blocks and progress."""

from __future__ import annotations

import enum
import hashlib
import struct
from array import array
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .request import EngineRequest, SamplingParams, embedding_digest

if TYPE_CHECKING:
    from .detokenize import OutputText


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # in the admission queue (new, or preempted and waiting to recompute)
    RUNNING = "running"  # holds KV blocks; prefilling or decoding
    FINISHED = "finished"


class Sequence:
    """Tokens are `prompt + outputs`; `num_computed_tokens` of them have their K/V in `block_table`.

    Each step the scheduler gives a sequence `num_tokens - num_computed_tokens` tokens (one when
    decoding, a chunk of the prompt when prefilling, prompt + outputs after a preemption); when the
    step catches it up, the logits of its last token pick the next token.
    """

    def __init__(self, request: EngineRequest, arrival: int, block_size: int) -> None:
        prompt = [int(t) for t in request.prompt_token_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        self.request_id = request.request_id
        self.sampling: SamplingParams = request.sampling
        self.arrival = arrival
        self.block_size = block_size
        self.token_ids: list[int] = prompt
        self.num_prompt_tokens = len(prompt)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Blocks pinned for this sequence before it was queued (BlockManager.pin_prefix): its first
        # prefix hits, kept until it finishes, so the KV of images sent without rows stays.
        self.pinned_blocks: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks already published to the prefix cache
        self.num_computed_tokens = 0
        # Prompt tokens whose K/V the prefix cache held at first admission (None until admitted);
        # reported as usage. Not updated when a preempted sequence is readmitted.
        self.num_prefix_hit_tokens: int | None = None
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None  # a seeded request's own stream (the sampler's)
        self.detok: OutputText | None = None
        self._set_images(request)
        self._block_hashes: list[bytes] = []
        self._cache_salt = bytes(request.cache_salt)

    # ------------------------------------------------------------------ images

    def _set_images(self, request: EngineRequest) -> None:
        spans = [(int(s), int(e)) for s, e in request.image_spans]
        embeds = request.image_embeds
        n_rows = 0 if embeds is None else embeds.reshape(-1, embeds.shape[-1]).shape[0]
        prev_end = 0
        for s, e in spans:
            if not prev_end <= s < e <= self.num_prompt_tokens:
                raise ValueError(f"image spans must be ordered, non-empty and inside the prompt: {spans}")
            prev_end = e
        # Held images come without rows: their KV is pinned in the prefix cache (request.prefix_hold).
        held = frozenset(int(i) for i in request.held_images)
        if any(not 0 <= i < len(spans) for i in held):
            raise ValueError(f"held image indices {sorted(held)} outside the {len(spans)} image spans")
        with_rows = [(s, e) for i, (s, e) in enumerate(spans) if i not in held]
        if sum(e - s for s, e in with_rows) != n_rows:
            raise ValueError(
                f"image spans cover {sum(e - s for s, e in with_rows)} prompt positions but {n_rows} "
                "image embedding rows were given"
            )
        hashes = list(request.image_hashes)
        if hashes and len(hashes) != len(spans):
            raise ValueError(f"{len(spans)} image spans but {len(hashes)} image hashes")
        if held and not hashes:
            raise ValueError("held images need image hashes: their rows are not there to hash")
        self.image_embeds = None if embeds is None or n_rows == 0 else embeds.reshape(n_rows, -1)
        self.image_spans = spans
        self.held_images = held
        # Row offset of each image in image_embeds (a held image's is where the next one's rows start).
        self.image_row_offsets = [0]
        for i, (s, e) in enumerate(spans):
            self.image_row_offsets.append(self.image_row_offsets[-1] + (0 if i in held else e - s))
        if not hashes and spans:  # no content hash given: hash what we were sent, per image
            hashes = [
                embedding_digest(self.image_embeds[a:b])
                for a, b in zip(self.image_row_offsets, self.image_row_offsets[1:], strict=False)
            ]
        self.image_hashes = [h.encode() if isinstance(h, str) else bytes(h) for h in hashes]

    def image_rows(self, start: int, end: int) -> list[tuple[int, Tensor]]:
        """(position, rows) pieces of image embeddings for prompt positions in [start, end)."""
        out = []
        for i, ((s, e), row0) in enumerate(zip(self.image_spans, self.image_row_offsets, strict=False)):
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                if i in self.held_images:  # its pinned KV should have covered these positions
                    raise RuntimeError(f"{self}: image {i} came without rows, but positions {lo}..{hi} "
                                       "are not in its pinned prefix")
                out.append((lo, self.image_embeds[row0 + lo - s : row0 + hi - s]))
        return out

    # ------------------------------------------------------------------ tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def prev_tokens(self, device: torch.device) -> Tensor:
        """Generated ids [1, n]: what HF's repetition penalty sees (upstream generates from embeds)."""
        return torch.tensor([self.output_token_ids], dtype=torch.long, device=device)

    # ------------------------------------------------------------------ blocks

    @property
    def num_full_blocks(self) -> int:
        return self.num_tokens // self.block_size

    def block_hash(self, i: int) -> bytes:
        """Content key of full block i: a chain over every earlier block's tokens and images.

        Seeded with the request's cache salt; covers the block's token ids and, for each image whose
        span overlaps it, the image's content hash and span: every image is the same `<IMG_CONTEXT>`
        run, so ids alone would let two different images share KV.
        """
        while len(self._block_hashes) <= i:
            j = len(self._block_hashes)
            start, end = j * self.block_size, (j + 1) * self.block_size
            if end > self.num_tokens:
                raise IndexError(f"block {j} is not full")
            # The chain starts from the request's salt (b"" = the shared cache): no block hash of one
            # salt equals one of another, so prefix reuse never crosses tenants.
            h = hashlib.sha256(self._block_hashes[-1] if self._block_hashes else self._cache_salt)
            h.update(array("q", self.token_ids[start:end]).tobytes())
            for (s, e), image_hash in zip(self.image_spans, self.image_hashes, strict=True):
                if s < end and e > start:
                    h.update(b"img" + struct.pack("<qq", s, e) + image_hash)
            self._block_hashes.append(h.digest())
        return self._block_hashes[i]

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
