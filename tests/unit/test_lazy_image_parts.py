"""Pure parts of the gateway's lazy-images path: slots, the NeedImages check, one encode per video."""

from __future__ import annotations

import asyncio

import pytest

from gateway.decoder_exchange import needed_indices
from gateway.feature_cache import Entry
from gateway.image_slots import ImageSlot, SlotMismatch, combine_slots, combined_key
from gateway.peers import PeerProtocolError
from gateway.video_once import VideoEncodes
from internvl.v1 import decoder_pb2, tensor_pb2

F32 = tensor_pb2.DTYPE_FLOAT32


def entry(tiles: int, fill: int) -> Entry:
    return Entry(F32, (tiles, 2, 4), bytes([fill]) * (tiles * 2 * 4 * 4))


def test_need_images_must_be_ascending_distinct_and_in_range() -> None:
    def answer(*indices: int) -> decoder_pb2.GenerateResponse:
        return decoder_pb2.GenerateResponse(need_images=decoder_pb2.NeedImages(indices=indices))

    assert needed_indices(answer(), 3) == []
    assert needed_indices(answer(0, 2), 3) == [0, 2]
    for bad in (answer(2, 0), answer(1, 1), answer(3), answer(-1)):
        with pytest.raises(PeerProtocolError, match="ascending, distinct and in range"):
            needed_indices(bad, 3)
    with pytest.raises(PeerProtocolError, match="without NeedImages"):
        needed_indices(decoder_pb2.GenerateResponse(text="hi"), 3)


def test_a_slot_loads_once_and_checks_what_it_announced() -> None:
    calls = []

    async def load() -> Entry:
        calls.append(1)
        await asyncio.sleep(0)
        return entry(2, 7)

    async def scenario() -> None:
        slot = ImageSlot("k", F32, (2, 2, 4), load)
        assert slot.nbytes == 64 and slot.descriptor().tensor.byte_length == 64
        assert slot.descriptor().num_tiles == 2 and slot.descriptor().feature_key == "k"
        first, second = await asyncio.gather(slot.entry(), slot.entry())
        assert first is second and calls == [1]
        wrong = ImageSlot("k", F32, (3, 2, 4), load)
        with pytest.raises(SlotMismatch, match="the decoder was told"):
            await wrong.entry()

    asyncio.run(scenario())


def test_combined_slots_load_lazily_under_the_combined_key() -> None:
    loads = []

    def loader(tiles: int, fill: int):
        async def load() -> Entry:
            loads.append(fill)
            return entry(tiles, fill)
        return load

    async def scenario() -> None:
        parts = [ImageSlot("a", F32, (1, 2, 4), loader(1, 1)), ImageSlot("b", F32, (2, 2, 4), loader(2, 2))]
        (combined,) = combine_slots(parts)
        assert combined.key == combined_key(["a", "b"]) and combined.shape == (3, 2, 4)
        assert loads == []  # nothing read until the decoder asks
        got = await combined.entry()
        assert bytes(got.payload) == bytes([1]) * 32 + bytes([2]) * 64 and sorted(loads) == [1, 2]
        assert combine_slots(parts[:1]) == parts[:1]

    asyncio.run(scenario())


def test_a_video_is_encoded_once_whatever_asks_for_its_frames() -> None:
    encodes = []

    async def encode() -> list[Entry]:
        encodes.append(1)
        await asyncio.sleep(0)
        return [entry(1, i) for i in range(4)]

    async def scenario() -> None:
        videos = VideoEncodes()
        assert not videos.encoded("v")
        frames = await asyncio.gather(*(videos.frames("v", encode) for _ in range(5)))
        assert encodes == [1] and videos.encoded("v") and all(f == frames[0] for f in frames)
        await videos.frames("w", encode)
        assert encodes == [1, 1]
        videos.close()

    asyncio.run(scenario())
