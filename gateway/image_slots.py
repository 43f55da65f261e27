"""One image block of a decoder request, described before its embedding bytes are at hand.

A lazy-images conversation (decoder.proto, Generate) tells the decoder every image's key and shape
first and fetches the bytes only of the images the decoder asks for. An `ImageSlot` is that: the key
and the tensor header (known from the encoder for a new image, or from the session's record of its
tiles for an earlier one), and how to load the entry (feature cache, or the encoder) when asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from gateway.feature_cache import Entry, file_sha256
from internvl.v1 import decoder_pb2
from services.common.wire import make_header

Load = Callable[[], Awaitable[Entry]]


class SlotMismatch(RuntimeError):
    """The loaded entry is not the tensor the decoder was told about."""


def combined_key(keys: Sequence[str]) -> str:
    """The key of several images' tiles behind one placeholder (upstream num_patches_list=None)."""
    return file_sha256("|".join(keys).encode())


@dataclass(eq=False)
class ImageSlot:
    key: str
    dtype: int  # internvl.v1.DType
    shape: tuple[int, ...]  # [num_tiles, tokens_per_tile, hidden]
    load: Load | None = None  # None: `loaded` is set
    loaded: Entry | None = None
    _task: asyncio.Future | None = field(default=None, repr=False)

    @classmethod
    def of(cls, key: str, entry: Entry) -> ImageSlot:
        return cls(key, entry.dtype, entry.shape, loaded=entry)

    @property
    def num_tiles(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return make_header(self.dtype, self.shape).byte_length

    def descriptor(self) -> decoder_pb2.ImageDescriptor:
        return decoder_pb2.ImageDescriptor(num_tiles=self.num_tiles, feature_key=self.key,
                                           tensor=make_header(self.dtype, self.shape))

    async def entry(self) -> Entry:
        """The embeddings, loaded once (concurrent callers share the load)."""
        if self.loaded is not None:
            return self.loaded
        if self._task is None:
            self._task = asyncio.ensure_future(self._load())
        return await self._task

    async def _load(self) -> Entry:
        assert self.load is not None, "a slot without a loader must be built with its entry"
        entry = await self.load()
        if entry.dtype != self.dtype or entry.shape != self.shape:
            raise SlotMismatch(f"image {self.key[:24]}...: its features are {list(entry.shape)} dtype {entry.dtype}, "
                               f"the decoder was told {list(self.shape)} dtype {self.dtype}")
        self.loaded = entry
        return entry

    def cancel(self) -> None:
        """Stop a load nobody waits for any more."""
        if self._task is not None and not self._task.done():
            self._task.cancel()


def combine_slots(slots: Sequence[ImageSlot]) -> list[ImageSlot]:
    """All images' tiles as one block, loaded (concurrently) only when asked for."""
    if len(slots) <= 1:
        return list(slots)
    first = slots[0]
    shape = (sum(s.num_tiles for s in slots), *first.shape[1:])

    async def load() -> Entry:
        entries = await asyncio.gather(*(s.entry() for s in slots))
        return Entry(first.dtype, shape, b"".join(bytes(e.payload) for e in entries))

    return [ImageSlot(combined_key([s.key for s in slots]), first.dtype, shape, load)]
