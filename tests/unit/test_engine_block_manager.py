"""Paged KV block manager: reference counts, LRU free list, prefix reuse keyed by tokens and images."""

from __future__ import annotations

import pytest
import torch

from services.language_decoder.engine.block_manager import BlockManager
from services.language_decoder.engine.request import EngineRequest
from services.language_decoder.engine.sequence import Sequence

BS = 4


def seq(tokens: list[int], arrival: int = 0, images: list[tuple[int, int, str]] = ()) -> Sequence:
    spans = [(s, e) for s, e, _ in images]
    rows = sum(e - s for s, e in spans)
    embeds = torch.zeros(rows, 8) if rows else None
    req = EngineRequest(f"r{arrival}", tokens, image_embeds=embeds, image_spans=spans,
                        image_hashes=[h for _, _, h in images])
    return Sequence(req, arrival, BS)


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """Pretend the model ran every token of `s`."""
    s.num_computed_tokens = s.num_tokens
    bm.register_computed(s)
    return s


def _allocated_and_computed(bm: BlockManager, s: Sequence) -> Sequence:
    bm.allocate(s)
    return computed(bm, s)


def test_allocate_and_free_restore_every_block() -> None:
    bm = BlockManager(10, BS)
    a = seq(list(range(10)))  # 3 blocks
    assert bm.can_allocate(a)
    assert bm.allocate(a) == 0
    assert len(a.block_table) == 3 and bm.num_free_blocks == 7
    bm.check_invariants([a])
    bm.free(a)
    assert bm.num_free_blocks == 10 and a.block_table == []
    bm.check_invariants([])
    bm.free(a)  # idempotent: nothing left to release
    assert bm.num_free_blocks == 10


def test_decode_appends_a_block_only_at_block_boundaries() -> None:
    bm = BlockManager(10, BS)
    a = seq(list(range(8)))
    bm.allocate(a)
    assert len(a.block_table) == 2
    a.append_token(1)  # 9 tokens -> a third block
    assert bm.can_append(a)
    bm.append_slots(a)
    assert len(a.block_table) == 3
    for _ in range(3):
        a.append_token(1)
        bm.append_slots(a)
    assert len(a.block_table) == 3  # 12 tokens still fit 3 blocks


def test_prefix_hit_shares_blocks_and_never_the_last_token_block() -> None:
    bm = BlockManager(20, BS)
    a = _allocated_and_computed(bm, seq(list(range(12))))
    b = seq(list(range(12)) + [50, 51])  # same 3 full blocks, then 2 new tokens
    assert bm.allocate(b) == 12
    assert b.block_table[:3] == a.block_table[:3]
    assert all(bm.ref_counts[x] == 2 for x in a.block_table)
    # Identical prompt: the block holding the last token is recomputed, not shared.
    c = seq(list(range(12)), arrival=2)
    assert bm.allocate(c) == 8
    assert c.block_table[:2] == a.block_table[:2] and c.block_table[2] != a.block_table[2]
    bm.check_invariants([a, b, c])
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_free_blocks == 20
    bm.check_invariants([])


def test_freed_blocks_stay_reusable_until_handed_out_again() -> None:
    bm = BlockManager(6, BS)
    a = _allocated_and_computed(bm, seq(list(range(9))))  # 3 blocks, 2 full
    bm.free(a)
    b = seq(list(range(9)), arrival=1)
    assert bm.can_allocate(b)
    assert bm.allocate(b) == 8  # both full blocks revived from the free list
    bm.free(b)
    # Fill the whole cache with other content: the old blocks are evicted, their hashes dropped.
    others = [_allocated_and_computed(bm, seq([90 + i] * 8, arrival=10 + i)) for i in range(3)]
    assert bm.num_free_blocks == 0
    for o in others:
        bm.free(o)
    c = seq(list(range(9)), arrival=20)
    assert bm.allocate(c) == 0
    bm.check_invariants([c])


def test_eviction_is_least_recently_freed_first_and_tail_first() -> None:
    bm = BlockManager(4, BS)
    a = _allocated_and_computed(bm, seq(list(range(8))))  # blocks [0, 1]
    bm.free(a)  # freed tail first: block 1 is evicted before block 0
    evictor = _allocated_and_computed(bm, seq([70] * 12, arrival=1))  # takes 2 fresh blocks and then 1
    assert a.block_table == []
    bm.free(evictor)
    b = seq(list(range(8)) + [5], arrival=2)
    assert bm.allocate(b) == 4  # the first block of `a` survived


def test_can_allocate_counts_revived_free_blocks() -> None:
    bm = BlockManager(3, BS)
    a = _allocated_and_computed(bm, seq(list(range(8))))
    bm.free(a)
    b = seq(list(range(8)) + [1, 2, 3, 4], arrival=1)  # 3 blocks: 2 cached (free) + 1 new -> all 3 free
    assert bm.can_allocate(b)
    assert not bm.can_allocate(b, reserve=1)
    bm.allocate(b)
    assert bm.num_free_blocks == 0


def test_two_different_images_never_share_kv() -> None:
    bm = BlockManager(40, BS)
    tokens = [1, 2, 3, 4, 5, 6] + [9] * 8 + [7, 8, 10, 11, 12, 13]  # image run at [6, 14)
    a = _allocated_and_computed(bm, seq(tokens, 0, images=[(6, 14, "cat")]))
    b = seq(tokens, 1, images=[(6, 14, "dog")])
    cached = bm.allocate(b)
    assert cached == 4  # only block 0 lies entirely before the image
    assert b.block_table[0] == a.block_table[0]
    assert not set(b.block_table[1:]) & set(a.block_table)
    same = seq(tokens, 2, images=[(6, 14, "cat")])
    assert bm.allocate(same) == 16  # same image: every full block except the last token's
    bm.check_invariants([a, b, same])


def test_image_span_is_part_of_the_key() -> None:
    bm = BlockManager(40, BS)
    tokens = [1, 2, 3] + [9] * 10 + [4, 5, 6, 7]
    _allocated_and_computed(bm, seq(tokens, 0, images=[(3, 13, "x")]))
    split = seq(tokens, 1, images=[(3, 8, "x"), (8, 13, "x")])
    assert bm.allocate(split) == 0  # block 0 holds image tokens too


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(20, BS, enable_prefix_caching=False)
    _allocated_and_computed(bm, seq(list(range(12))))
    assert bm.allocate(seq(list(range(12)) + [1], arrival=1)) == 0


def test_over_allocation_and_double_free_are_errors() -> None:
    bm = BlockManager(2, BS)
    big = seq(list(range(12)))
    assert not bm.can_allocate(big)
    with pytest.raises(RuntimeError):
        bm.allocate(big)
    a = seq(list(range(4)))
    bm.allocate(a)
    with pytest.raises(RuntimeError):
        bm.allocate(a)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table  # a stale table handed back twice
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(a)


def test_errors_say_what_went_wrong() -> None:
    for sizes in [(0, BS), (4, 0)]:
        with pytest.raises(ValueError, match=r"^num_blocks and block_size must be >= 1$"):
            BlockManager(*sizes)
    assert BlockManager(1, 1).num_free_blocks == 1  # the smallest valid manager
    bm = BlockManager(2, BS)
    a = seq(list(range(4)))
    bm.allocate(a)
    with pytest.raises(RuntimeError, match="already holds blocks"):
        bm.allocate(a)
    with pytest.raises(RuntimeError, match="not enough free blocks"):
        bm.allocate(seq(list(range(12)), arrival=1))
    for _ in range(8):
        a.append_token(1)  # 12 tokens: two more blocks, one free
    with pytest.raises(RuntimeError, match="not enough free blocks"):
        bm.append_slots(a)


def test_can_append_exactly_when_the_free_blocks_suffice() -> None:
    bm = BlockManager(3, BS)
    a = seq(list(range(BS)))
    bm.allocate(a)  # one block held, two free
    for _ in range(2 * BS):
        a.append_token(1)
    assert bm.can_append(a)  # needs exactly the two free blocks
    a.append_token(1)
    assert not bm.can_append(a)


def test_check_invariants_names_what_disagrees() -> None:
    bm = BlockManager(12, BS)
    a = _allocated_and_computed(bm, seq(list(range(12))))
    bm.check_invariants([a])
    with pytest.raises(AssertionError, match=r"^reference counts disagree with block tables at blocks \[0, 1, 2\]$"):
        bm.check_invariants([])
    held = list(bm.ref_counts)
    bm.ref_counts = [n + 1 for n in held]  # every block off by one: the message lists the first ten
    with pytest.raises(AssertionError, match=r"at blocks \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]$"):
        bm.check_invariants([a])
    bm.ref_counts = held
    spare = next(iter(bm._free))
    del bm._free[spare]
    with pytest.raises(AssertionError, match="^free list disagrees with reference counts$"):
        bm.check_invariants([a])
    bm._free[spare] = None
    bm.hash_to_block[b"other content"] = a.block_table[0]
    with pytest.raises(AssertionError, match=f"^hash index points at block {a.block_table[0]} holding other content$"):
        bm.check_invariants([a])
