"""Prefix pins (lazy images): what the decoder declares held stays held until the request finishes.

Block-manager level: pinned blocks leave the free list, survive any allocation pressure, become the
sequence's first hits even after the hash index forgot them, and go back when unpinned. Engine level:
a request whose images come without rows (held) gives the tokens of the same request with all rows,
even when other traffic evicted every unpinned block between the hold and admission.
"""

from __future__ import annotations

import pytest
import torch

from services.language_decoder.engine import EngineRequest, SamplingParams, find_image_spans
from services.language_decoder.engine.block_manager import BlockManager
from services.language_decoder.engine.sequence import Sequence
from tests.engine_support import IMG_CTX, random_prompt, reference_greedy, tiny_engine, tiny_model, token_ids

BS = 4


def seq(tokens: list[int], rid: str = "r", image: tuple[int, int, str] | None = None, held: bool = False) -> Sequence:
    spans = [image[:2]] if image else []
    rows = 0 if held or not image else image[1] - image[0]
    req = EngineRequest(rid, tokens, image_embeds=torch.zeros(rows, 8) if rows else None, image_spans=spans,
                        image_hashes=[image[2]] if image else [], held_images=[0] if held else [])
    return Sequence(req, 0, BS)


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    bm.allocate(s)
    s.num_computed_tokens = s.num_tokens
    bm.register_computed(s)
    return s


def test_pinned_blocks_survive_allocation_pressure_and_serve_the_sequence() -> None:
    bm = BlockManager(8, BS)
    first = computed(bm, seq(list(range(12))))  # 3 full blocks published
    bm.free(first)
    assert bm.num_free_blocks == 8
    follow = seq(list(range(12)) + [50, 51, 52])
    pinned = bm.pin_prefix(follow)
    assert len(pinned) == 3
    assert bm.num_pinned_blocks == 3 and bm.num_free_blocks == 5
    bm.check_invariants([])
    # Other traffic takes every free block: none of them is a pinned one.
    hog = seq(list(range(100, 120)), "hog")
    bm.allocate(hog)
    assert not set(hog.block_table) & set(pinned) and bm.num_free_blocks == 0
    bm.free(hog)  # and publishes nothing: the pinned content is still the only copy
    # The sequence takes its pins as its first hits.
    follow.pinned_blocks = list(pinned)
    assert bm.allocate(follow) == 12 and follow.block_table[:3] == pinned
    bm.check_invariants([follow])
    bm.free(follow)  # a preemption: the pins keep the blocks out of the free list
    assert bm.num_free_blocks == 5
    bm.unpin(follow.pinned_blocks)
    assert bm.num_pinned_blocks == 0 and bm.num_free_blocks == 8
    bm.check_invariants([])


def test_pins_hold_even_after_the_hash_index_moved_on() -> None:
    bm = BlockManager(6, BS)
    a = computed(bm, seq(list(range(9))))  # blocks 0, 1 published
    bm.free(a)
    s = seq(list(range(9)))
    pinned = bm.pin_prefix(s)
    assert len(pinned) == 2
    bm.reset_prefix_cache()  # the index forgets everything: the pinned KV is still there
    assert bm.match_prefix(seq(list(range(9)))) == []
    s.pinned_blocks = pinned
    assert bm.match_prefix(s) == pinned
    assert bm.allocate(s) == 8


def test_pins_respect_the_budget_and_unpinning_twice_fails() -> None:
    bm = BlockManager(8, BS, max_pinned_blocks=2)
    a = computed(bm, seq(list(range(17))))  # 4 blocks published
    bm.free(a)
    first = bm.pin_prefix(seq(list(range(17))))
    assert len(first) == 2  # cut to the budget
    assert bm.pin_prefix(seq(list(range(17)))) == []  # nothing left of it
    bm.unpin(first)
    with pytest.raises(RuntimeError, match="not pinned"):
        bm.unpin(first)
    bm.check_invariants([])


def test_an_image_without_rows_must_never_be_fed() -> None:
    s = seq([1, 2] + [IMG_CTX] * 4 + [3, 4], image=(2, 6, "sha-a"), held=True)
    assert s.image_rows(6, 8) == []
    with pytest.raises(RuntimeError, match="came without rows"):
        s.image_rows(0, 8)


def test_held_images_need_hashes() -> None:
    with pytest.raises(ValueError, match="need image hashes"):
        Sequence(EngineRequest("r", [1, IMG_CTX, IMG_CTX, 2], image_spans=[(1, 3)], held_images=[0]), 0, BS)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_held_image_request_matches_full_request_despite_eviction_traffic(model) -> None:
    """The race: the engine says 'held', a flood of other prompts needs every block, then the request
    arrives without the image's rows. Its tokens are those of the full request, from the pinned KV."""
    gen = torch.Generator().manual_seed(11)
    prompt = random_prompt(gen, 9, 9) + [IMG_CTX] * 16 + random_prompt(gen, 11, 11)
    spans = find_image_spans(prompt, IMG_CTX)
    image = torch.randn(16, 32, generator=gen) * 4
    engine = tiny_engine(model, block_size=4, num_kv_blocks=24, max_model_len=48)
    params = SamplingParams(max_new_tokens=6)
    full = engine.run_until_done([EngineRequest("turn1", prompt, params, image, spans, ["sha-img"])])
    expected = reference_greedy(model, prompt, 6, image_embeds=image)
    assert token_ids(full["turn1"]) == expected

    probe = EngineRequest("probe", prompt, image_spans=spans, image_hashes=["sha-img"], held_images=[0])
    hold = engine.hold_prefix(probe)
    assert hold.held_images == (0,) and hold.cached_tokens == (len(prompt) - 1) // 4 * 4
    # Other prompts now need every unpinned block: without the pin the image's KV would be gone.
    flood = [EngineRequest(f"flood{i}", random_prompt(gen, 40, 40), SamplingParams(max_new_tokens=2))
             for i in range(3)]
    engine.run_until_done(flood)
    assert engine.block_manager.match_prefix(Sequence(probe, 0, 4)) == hold.blocks
    lazy = EngineRequest("turn1-again", prompt, params, None, spans, ["sha-img"], held_images=[0], prefix_hold=hold)
    out = engine.run_until_done([lazy])["turn1-again"]
    assert token_ids(out) == expected
    assert out[-1].usage.cached_prompt_tokens == hold.cached_tokens
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_pinned_blocks == 0 and engine.block_manager.num_free_blocks == 24
    # The control: the same flood without a pin does evict the image's KV.
    engine.run_until_done([EngineRequest(f"flood-again{i}", random_prompt(gen, 40, 40),
                                         SamplingParams(max_new_tokens=2)) for i in range(3)])
    again = engine.hold_prefix(probe)
    assert again.held_images == ()
    engine.release_hold(again)


def test_a_hold_given_back_unpins_and_cannot_be_used(model) -> None:
    gen = torch.Generator().manual_seed(12)
    prompt = random_prompt(gen, 21, 21)
    engine = tiny_engine(model, block_size=4, num_kv_blocks=32, max_model_len=64)
    engine.run_until_done([EngineRequest("a", prompt, SamplingParams(max_new_tokens=2))])
    hold = engine.hold_prefix(EngineRequest("probe", prompt))
    assert engine.block_manager.num_pinned_blocks == len(hold.blocks) == 5
    engine.release_hold(hold)
    engine.release_hold(hold)  # idempotent
    assert engine.block_manager.num_pinned_blocks == 0
    with pytest.raises(ValueError, match="already used or released"):
        engine.add_request(EngineRequest("b", prompt, prefix_hold=hold))


def test_async_engine_holds_and_gives_back_on_the_engine_thread(model) -> None:
    """Through AsyncEngine: a hold passed on with its request is released when the request ends; one
    given back is released at once; a request cancelled before admission releases its hold too."""
    import asyncio

    from services.language_decoder.engine import AsyncEngine

    gen = torch.Generator().manual_seed(13)
    prompt = random_prompt(gen, 9, 9) + [IMG_CTX] * 16 + random_prompt(gen, 11, 11)
    spans = find_image_spans(prompt, IMG_CTX)
    image = torch.randn(16, 32, generator=gen) * 4
    engine = AsyncEngine(tiny_engine(model, block_size=4, num_kv_blocks=64, max_model_len=64))
    blocks = engine.engine.block_manager
    params = SamplingParams(max_new_tokens=4)

    async def drain(request: EngineRequest) -> list[int]:
        return [t for out in [o async for o in engine.generate(request)] for t in out.token_ids]

    async def scenario() -> None:
        expected = await drain(EngineRequest("full", prompt, params, image, spans, ["sha-a"]))
        probe = EngineRequest("probe", prompt, image_spans=spans, image_hashes=["sha-a"], held_images=[0])
        hold = await engine.hold_prefix(probe)
        assert hold.held_images == (0,) and blocks.num_pinned_blocks == len(hold.blocks) > 0
        lazy = EngineRequest("lazy", prompt, params, None, spans, ["sha-a"], held_images=[0], prefix_hold=hold)
        assert await drain(lazy) == expected
        assert blocks.num_pinned_blocks == 0  # released with the request

        given_back = await engine.hold_prefix(probe)
        engine.release_hold(given_back)
        cancelled = await engine.hold_prefix(probe)
        stream = engine.generate(EngineRequest("gone", prompt, params, None, spans, ["sha-a"], held_images=[0],
                                               prefix_hold=cancelled))
        task = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # the request is submitted ...
        task.cancel()  # ... and its caller goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()
        # The engine thread settles the releases before its next request: one more round trip.
        await drain(EngineRequest("after", prompt, params, image, spans, ["sha-a"]))
        assert blocks.num_pinned_blocks == 0

    try:
        asyncio.run(scenario())
    finally:
        engine.close()
    blocks.check_invariants([])
