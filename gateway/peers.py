"""Channels from the gateway to the encoder and decoder replicas.

A target is `host:port`, a comma-separated list of `ip:port` replicas, or any gRPC name such as
`dns:///vision-encoder-headless:50051`. Channels use client-side round-robin over every address the
name resolves to: gRPC keeps connections open, so balancing per connection (a plain ClusterIP) would
pin all traffic to one pod. With `credentials` (`ClientTls.credentials()`) a channel uses TLS, and
presents a client certificate to peers that require one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc

from gateway.feature_cache import Entry
from internvl.v1 import decoder_pb2, decoder_pb2_grpc, vision_pb2, vision_pb2_grpc
from services.common.wire import (
    DEFAULT_CHUNK_BYTES,
    Chunk,
    ChunkCollector,
    WireError,
    chunk_or,
    serialize_chunk_or_message,
)

MiB = 1024 * 1024


def channel_target(target: str) -> str:
    if "," in target and ":///" not in target and not target.startswith(("ipv4:", "ipv6:")):
        return "ipv4:" + target  # a static list of replicas (IP literals)
    return target


def make_channel(
    target: str, *, max_message_bytes: int = 64 * MiB, credentials: grpc.ChannelCredentials | None = None,
    extra_options: Sequence[tuple[str, object]] = (),
) -> grpc.aio.Channel:
    options = [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Re-resolve DNS soon after a replica goes away, and keep idle connections alive.
        ("grpc.dns_min_time_between_resolutions_ms", 5000),
        ("grpc.keepalive_time_ms", 30000),
        # Reconnect within seconds of a restarted peer (gRPC's default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 2000),
        *extra_options,
    ]
    if credentials is not None:
        return grpc.aio.secure_channel(channel_target(target), credentials, options=options)
    return grpc.aio.insecure_channel(channel_target(target), options=options)


def _method_path(service: str, method: str, descriptor) -> str:
    return f"/{descriptor.services_by_name[service].full_name}/{method}"


class PeerProtocolError(RuntimeError):
    """A peer's response stream broke the contract (chunks without header, wrong sizes)."""


class EncoderClient:
    def __init__(
        self, target: str, *, max_item_bytes: int = 256 * MiB, credentials: grpc.ChannelCredentials | None = None
    ):
        self.channel = make_channel(target, credentials=credentials)
        self._stub = vision_pb2_grpc.VisionEncoderStub(self.channel)
        # Encode's chunks arrive as `Chunk`s (no protobuf parse, no copy) and are relayed as they are.
        self._encode = self.channel.unary_stream(
            _method_path("VisionEncoder", "Encode", vision_pb2.DESCRIPTOR),
            request_serializer=vision_pb2.EncodeRequest.SerializeToString,
            response_deserializer=chunk_or(vision_pb2.EncodeResponse),
        )
        self._max_item_bytes = max_item_bytes
        self._info: vision_pb2.ModelInfo | None = None

    async def model_info(self, timeout: float | None = None) -> vision_pb2.ModelInfo:
        if self._info is None:
            self._info = await self._stub.GetModelInfo(vision_pb2.GetModelInfoRequest(), timeout=timeout)
        return self._info

    async def encode(
        self,
        request: vision_pb2.EncodeRequest,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> list[tuple[vision_pb2.EmbeddingHeader, Entry]]:
        """All items of one Encode call, each as the chunks it arrived in (sizes checked, nothing copied)."""
        items: list[tuple[vision_pb2.EmbeddingHeader, Entry]] = []
        header: vision_pb2.EmbeddingHeader | None = None
        item: ChunkCollector | None = None

        def finish() -> None:
            try:
                chunks = item.result()
            except WireError as exc:
                raise PeerProtocolError(f"encoder item {header.index}: {exc}") from exc
            items.append((header, Entry(header.tensor.dtype, tuple(header.tensor.shape), chunks)))

        call = self._encode(request, timeout=timeout, metadata=metadata)
        try:
            async for msg in call:
                if not isinstance(msg, Chunk) and msg.HasField("chunk"):
                    msg = Chunk.wrap(msg.chunk)  # one that protobuf parsed (unknown fields beside it, say)
                if isinstance(msg, Chunk):
                    try:
                        if item is None:
                            raise WireError("no header announced it")
                        item.add(msg)
                    except WireError as exc:
                        raise PeerProtocolError(f"encoder sent bytes beyond the announced tensor: {exc}") from exc
                elif msg.HasField("header"):
                    if item is not None:
                        finish()
                    header = msg.header
                    try:
                        item = ChunkCollector(header.tensor, max_bytes=self._max_item_bytes)
                    except WireError as exc:
                        raise PeerProtocolError(f"encoder sent a bad header: {exc}") from exc
        finally:
            call.cancel()  # no-op once finished; a cancelled caller (or a bad stream) stops the encode
        if item is not None:
            finish()
        return items

    async def close(self) -> None:
        await self.channel.close()


class DecoderClient:
    def __init__(
        self, target: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        credentials: grpc.ChannelCredentials | None = None, options: Sequence[tuple[str, object]] = (),
    ):
        self.channel = make_channel(target, credentials=credentials, extra_options=options)
        self._stub = decoder_pb2_grpc.LanguageDecoderStub(self.channel)
        # Generate's chunks go out as `Chunk` frames, serialized once upstream (the encoder, Redis).
        self._generate = self.channel.stream_stream(
            _method_path("LanguageDecoder", "Generate", decoder_pb2.DESCRIPTOR),
            request_serializer=serialize_chunk_or_message,
            response_deserializer=decoder_pb2.GenerateResponse.FromString,
        )
        self._chunk_bytes = chunk_bytes
        self._info: decoder_pb2.DecoderInfo | None = None

    async def model_info(self, timeout: float | None = None) -> decoder_pb2.DecoderInfo:
        if self._info is None:
            self._info = await self._stub.GetModelInfo(decoder_pb2.DecoderInfoRequest(), timeout=timeout)
        return self._info

    def generate(
        self,
        setup: decoder_pb2.GenerateSetup,
        images: Sequence[Entry],
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncIterator[decoder_pb2.GenerateResponse]:
        """Stream the setup and every image's bytes; iterate the returned call for the deltas.

        Cancelling the returned call (or its deadline passing) stops generation on the decoder.
        """

        async def requests() -> AsyncIterator[decoder_pb2.GenerateRequest | Chunk]:
            yield decoder_pb2.GenerateRequest(setup=setup)
            for entry in images:
                for chunk in entry.frames(self._chunk_bytes):
                    yield chunk  # a serialized GenerateRequest{chunk}: relayed without a copy

        return self._generate(requests(), timeout=timeout, metadata=metadata)

    def open_generate(self, *, timeout: float | None = None, metadata: Sequence[tuple[str, str]] = ()):
        """A Generate call to drive with write()/read() (the lazy-images conversation: gateway/decoder_exchange.py)."""
        return self._generate(timeout=timeout, metadata=metadata)

    @property
    def chunk_bytes(self) -> int:
        return self._chunk_bytes

    async def close(self) -> None:
        await self.channel.close()
