"""The gateway's side of a Generate call: the setup, then only the embedding bytes the decoder needs.

With a decoder that speaks the lazy-images conversation (DecoderInfo.lazy_images; decoder.proto,
Generate) the setup goes alone; the decoder answers NeedImages with the images whose KV it does not
hold, and only those are loaded (feature cache or encoder, concurrently) and sent. With an older
decoder every image is loaded (concurrently) and sent after the setup, as before. Either way the
caller iterates the decoder's text responses; the counters say what moved and what was skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc

from gateway.decoder_pool import RoutedDecoder
from gateway.image_slots import ImageSlot
from gateway.peers import PeerProtocolError
from gateway.transfer_stats import TransferStats
from internvl.v1 import decoder_pb2


def needed_indices(response: decoder_pb2.GenerateResponse, num_images: int) -> list[int]:
    """The images a NeedImages answer asks for; PeerProtocolError if the answer is malformed."""
    if not response.HasField("need_images"):
        raise PeerProtocolError("the decoder answered a lazy-images setup without NeedImages")
    indices = list(response.need_images.indices)
    if any(not 0 <= i < num_images for i in indices) or indices != sorted(set(indices)):
        raise PeerProtocolError(f"the decoder asked for images {indices[:16]} of {num_images}: "
                                "indices must be ascending, distinct and in range")
    return indices


async def generate(
    decoder: RoutedDecoder,  # the replica the router chose for this turn
    setup: decoder_pb2.GenerateSetup,
    slots: Sequence[ImageSlot],
    *,
    lazy: bool,
    stats: TransferStats,
    timeout: float | None = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[decoder_pb2.GenerateResponse]:
    """Run one Generate call; yields the decoder's text responses (NeedImages is consumed here).

    Raises grpc.aio.AioRpcError for the decoder's errors, PeerProtocolError for a broken answer,
    and whatever a slot's load raises. Closing the iterator cancels the call.
    """
    setup.lazy_images = lazy
    call = decoder.open_generate(timeout=timeout, metadata=metadata)
    try:
        await call.write(decoder_pb2.GenerateRequest(setup=setup))
        needed = list(range(len(slots)))
        if lazy:
            first = await call.read()
            if first is grpc.aio.EOF:
                await _raise_status(call)
                raise PeerProtocolError("the decoder ended the call without answering the setup")
            needed = needed_indices(first, len(slots))
        await _send(call, [slots[i] for i in needed], decoder.chunk_bytes, stats)
        held = [s for i, s in enumerate(slots) if i not in set(needed)]
        stats.decoder_skipped_bytes += sum(s.nbytes for s in held)
        stats.decoder_skipped_images += len(held)
        await call.done_writing()
        while (response := await call.read()) is not grpc.aio.EOF:
            yield response
        await _raise_status(call)
    finally:
        call.cancel()  # no-op once finished; stops generation if our client went away
        for slot in slots:
            slot.cancel()


async def _send(call, slots: Sequence[ImageSlot], chunk_bytes: int, stats: TransferStats) -> None:
    """Load the slots concurrently; send each one's bytes in order as soon as it and those before are in."""
    loads = [asyncio.ensure_future(s.entry()) for s in slots]
    try:
        for load in loads:
            entry = await load
            for frame in entry.frames(chunk_bytes):
                await call.write(frame)  # a serialized GenerateRequest{chunk}: relayed without a copy
            stats.decoder_sent_bytes += entry.nbytes
            stats.decoder_sent_images += 1
    finally:
        for load in loads:
            if not load.done():
                load.cancel()


async def _raise_status(call) -> None:
    """Raise the call's error status, if it ended with one."""
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise grpc.aio.AioRpcError(code, await call.initial_metadata(), await call.trailing_metadata(),
                                   details=await call.details())
