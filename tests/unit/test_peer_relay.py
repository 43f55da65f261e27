"""EncoderClient keeps the encoder's chunks as they arrived and checks their sizes; DecoderClient sends them
on byte for byte. Real aio gRPC servers on loopback that speak the wire format directly, so a test can send
exactly the (mis)behaviour it is about."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from gateway.feature_values import Entry
from gateway.peers import DecoderClient, EncoderClient, PeerProtocolError
from internvl.v1 import decoder_pb2, tensor_pb2, vision_pb2
from services.common.wire import Chunk, make_header

BF16 = tensor_pb2.DTYPE_BFLOAT16


def header_message(index: int, shape: Sequence[int]) -> bytes:
    return vision_pb2.EncodeResponse(header=vision_pb2.EmbeddingHeader(
        index=index, num_tiles=shape[0], tensor=make_header(BF16, shape))).SerializeToString()


class RawServer:
    """Encode answers with the given serialized messages; Generate records the raw request messages."""

    def __init__(self, encode_messages: Sequence[bytes] = ()):
        self.encode_messages = list(encode_messages)
        self.generate_requests: list[bytes] = []
        self.server = grpc.aio.server()
        self.port = 0

    async def __aenter__(self) -> RawServer:
        async def encode(request: bytes, context) -> AsyncIterator[bytes]:
            for message in self.encode_messages:
                yield message

        async def generate(request_iterator, context) -> AsyncIterator[bytes]:
            async for raw in request_iterator:
                self.generate_requests.append(raw)
            yield decoder_pb2.GenerateResponse(text="ok", finish_reason=decoder_pb2.FINISH_REASON_STOP
                                               ).SerializeToString()

        self.server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("internvl.v1.VisionEncoder", {
                "Encode": grpc.unary_stream_rpc_method_handler(encode)}),
            grpc.method_handlers_generic_handler("internvl.v1.LanguageDecoder", {
                "Generate": grpc.stream_stream_rpc_method_handler(generate)}),
        ))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop(None)


async def encode_with(messages: Sequence[bytes]):
    async with RawServer(messages) as server:
        client = EncoderClient(f"127.0.0.1:{server.port}")
        try:
            return await client.encode(vision_pb2.EncodeRequest(), timeout=10)
        finally:
            await client.close()


def test_items_keep_the_received_chunks_and_relay_them_byte_for_byte():
    first, second = os.urandom(2 * 3 * 4 * 2), os.urandom(1 * 3 * 4 * 2)
    chunks = [Chunk.wrap(first[:20]).frame, Chunk.wrap(first[20:]).frame, Chunk.wrap(second).frame]
    messages = [header_message(0, (2, 3, 4)), *chunks[:2], header_message(1, (1, 3, 4)), chunks[2]]

    async def scenario():
        items = await encode_with(messages)
        assert [h.index for h, _ in items] == [0, 1]
        entries = [e for _, e in items]
        assert [bytes(e.payload) for e in entries] == [first, second]
        assert [p.frame for e in entries for p in e.pieces] == chunks  # as they came, not re-cut
        async with RawServer() as decoder_server:
            decoder = DecoderClient(f"127.0.0.1:{decoder_server.port}")
            try:
                setup = decoder_pb2.GenerateSetup(request_id="relay")
                texts = [r.text async for r in decoder.generate(setup, entries, timeout=10)]
            finally:
                await decoder.close()
        assert texts == ["ok"]
        sent = decoder_server.generate_requests
        assert decoder_pb2.GenerateRequest.FromString(sent[0]).setup.request_id == "relay"
        assert sent[1:] == chunks  # the decoder got exactly the encoder's messages

    asyncio.run(scenario())


def test_a_chunk_that_protobuf_must_parse_is_still_taken():
    data = os.urandom(1 * 2 * 2 * 2)
    with_unknown_field = Chunk.wrap(data).frame + b"\x18\x07"  # field 3 (varint): not ours, ignored

    async def scenario():
        (item,) = await encode_with([header_message(0, (1, 2, 2)), with_unknown_field])
        assert bytes(item[1].payload) == data

    asyncio.run(scenario())


@pytest.mark.parametrize("messages, message", [
    ([Chunk.wrap(b"xx").frame], "no header announced it"),
    ([header_message(0, (1, 1, 2)), Chunk.wrap(b"12345").frame], "overruns the tensor"),
    ([header_message(0, (1, 1, 4)), Chunk.wrap(b"123").frame], "truncated: got 3 of 8"),
    ([header_message(0, (1, 1, 4)), Chunk.wrap(b"1234").frame, header_message(1, (1, 1, 1))],
     "truncated: got 4 of 8"),
])
def test_a_stream_that_breaks_the_contract_is_a_protocol_error(messages, message):
    with pytest.raises(PeerProtocolError, match=message):
        asyncio.run(encode_with(messages))


def test_an_oversized_header_is_refused_before_anything_is_collected():
    async def scenario():
        async with RawServer([header_message(0, (64, 256, 4096))]) as server:
            client = EncoderClient(f"127.0.0.1:{server.port}", max_item_bytes=1 << 20)
            try:
                with pytest.raises(PeerProtocolError, match="bad header.*exceeds the limit"):
                    await client.encode(vision_pb2.EncodeRequest(), timeout=10)
            finally:
                await client.close()

    asyncio.run(scenario())


def test_a_contiguous_entry_is_cut_to_the_decoder_chunk_size():
    data = os.urandom(2 * 3 * 4 * 2)

    async def scenario():
        async with RawServer() as server:
            decoder = DecoderClient(f"127.0.0.1:{server.port}", chunk_bytes=10)
            try:
                [r async for r in decoder.generate(decoder_pb2.GenerateSetup(), [Entry(BF16, (2, 3, 4), data)],
                                                   timeout=10)]
            finally:
                await decoder.close()
        chunks = [decoder_pb2.GenerateRequest.FromString(raw).chunk for raw in server.generate_requests[1:]]
        assert b"".join(chunks) == data and all(len(c) <= 10 for c in chunks)

    asyncio.run(scenario())
