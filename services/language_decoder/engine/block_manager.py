"""Paged KV blocks: reference counts, a free list in LRU order, and prefix reuse by content hash.

A full block whose K/V has been computed is published under `Sequence.block_hash(i)` (a chain over
the tokens and image hashes of every block up to it). A later sequence with the same chain reuses the
block instead of recomputing it. Freed blocks keep their content and hash until the free list hands
them out again, oldest first, so a finished turn's KV stays reusable for the next turn while memory
is not needed elsewhere. Plain Python: no tensors here.

Pins: `pin_prefix` takes a reference on the cached blocks of a sequence's longest cached prefix
without a block table (a decoder that told its client "I hold these images' KV, send no bytes" must
keep that KV until the request runs). A pinned block is out of the free list, so nothing evicts or
overwrites it; the sequence later takes its pinned blocks as its first prefix hits whatever the hash
index says by then, and `unpin` drops the pin when the request finishes. At most `max_pinned_blocks`
are pinned at once, so the head of the queue can always be admitted once nothing runs.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from collections.abc import Sequence as Blocks

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 max_pinned_blocks: int | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        # None = all but one block; the engine passes num_blocks - blocks of one longest sequence.
        self.max_pinned_blocks = num_blocks - 1 if max_pinned_blocks is None else max(0, max_pinned_blocks)
        self._pins: Counter[int] = Counter()  # block -> pins on it (each also counted in ref_counts)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # An ordered set: O(1) pop-oldest, removal on a cache hit, and append on release.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest computed prefix of `seq`, in order.

        The block holding the last token is never taken from the cache: that token must run through
        the model to give the logits of the first new token.
        """
        hits = list(seq.pinned_blocks)  # verified when pinned, and never overwritten since
        if not self.enable_prefix_caching:
            return hits
        for i in range(len(hits), (seq.num_tokens - 1) // self.block_size):
            block = self.hash_to_block.get(seq.block_hash(i))
            if block is None:
                break
            hits.append(block)
        return hits

    @property
    def num_pinned_blocks(self) -> int:
        return sum(self._pins.values())

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Whether `seq` (all its tokens) fits now, keeping `reserve` blocks free."""
        hits = self.match_prefix(seq)
        # A hit on a free block still takes it out of the free list.
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)
        new = self.blocks_for(seq.num_tokens) - len(hits)
        return new + revived + reserve <= len(self._free)

    def can_append(self, seq: Sequence) -> bool:
        """Whether the free list covers the blocks `seq` needs for all its tokens."""
        return self.blocks_for(seq.num_tokens) - len(seq.block_table) <= len(self._free)

    # ------------------------------------------------------------------ changes

    def allocate(self, seq: Sequence) -> int:
        """Give `seq` a block table for all its tokens; returns how many tokens came from the cache."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds blocks")
        if not self.can_allocate(seq):
            raise RuntimeError(f"not enough free blocks for {seq}")
        hits = self.match_prefix(seq)
        for block in hits:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
        seq.block_table = list(hits)
        seq.num_hashed_blocks = len(hits)
        self.append_slots(seq)
        return len(hits) * self.block_size

    def pin_prefix(self, seq: Sequence) -> list[int]:
        """Pin the cached blocks of `seq`'s longest cached prefix (within the pin budget); returns them.

        `seq` holds no blocks. The blocks stay out of the free list until `unpin`.
        """
        if seq.block_table or seq.pinned_blocks:
            raise RuntimeError(f"{seq} already holds blocks")
        hits = self.match_prefix(seq)[: max(0, self.max_pinned_blocks - self.num_pinned_blocks)]
        for block in hits:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
            self._pins[block] += 1
        return hits

    def unpin(self, blocks: Blocks[int]) -> None:
        """Drop pins taken by `pin_prefix` (tail first, as `free` does)."""
        for block in reversed(blocks):
            if self._pins[block] <= 0:
                raise RuntimeError(f"block {block} is not pinned")
            self._pins[block] -= 1
            if not self._pins[block]:
                del self._pins[block]
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None

    def append_slots(self, seq: Sequence) -> None:
        """Grow `seq`'s block table to cover all its tokens (decode adds one block every block_size)."""
        need = self.blocks_for(seq.num_tokens) - len(seq.block_table)
        if need > len(self._free):
            raise RuntimeError(f"not enough free blocks for {seq}")
        for _ in range(need):
            seq.block_table.append(self._take_free())

    def register_computed(self, seq: Sequence) -> None:
        """Publish the full blocks of `seq` whose K/V are now computed, for reuse by later prompts."""
        if not self.enable_prefix_caching:
            return
        done = seq.num_hashed_blocks
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i in range(done, full):
            block, h = seq.block_table[i], seq.block_hash(i)
            self.block_hashes[block] = h
            self.hash_to_block[h] = block  # the newest copy wins; the old one stays valid until reused
        seq.num_hashed_blocks = max(done, full)

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks (finish, abort, error or preemption). Idempotent."""
        # Tail first: in LRU order the tail of a sequence is evicted before the shared prefix.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None
            elif self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} freed twice")
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        old = self.block_hashes[block]
        if old is not None:  # the block's cached content is about to be overwritten
            if self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
            self.block_hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def reset_prefix_cache(self) -> None:
        """Forget all cached content (e.g. after the model's weights changed)."""
        self.hash_to_block.clear()
        self.block_hashes = [None] * self.num_blocks

    # ------------------------------------------------------------------ checks

    def check_invariants(self, live: Iterable[Sequence]) -> None:
        """Raise if reference counts disagree with the live block tables and pins (used by tests)."""
        counts = [0] * self.num_blocks
        for block, pins in self._pins.items():
            counts[block] += pins
        for seq in live:
            for block in seq.block_table:
                counts[block] += 1
        if counts != self.ref_counts:
            bad = [b for b in range(self.num_blocks) if counts[b] != self.ref_counts[b]][:10]
            raise AssertionError(f"reference counts disagree with block tables at blocks {bad}")
        free = {b for b in range(self.num_blocks) if counts[b] == 0}
        if free != set(self._free):
            raise AssertionError("free list disagrees with reference counts")
        for h, block in self.hash_to_block.items():
            if self.block_hashes[block] != h:
                raise AssertionError(f"hash index points at block {block} holding other content")
