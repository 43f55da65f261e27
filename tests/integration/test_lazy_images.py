"""The lazy-images conversation (decoder.proto, Generate) with every part a real process.

A 4-turn session through the gateway moves no embedding bytes after its first turn's image: the
decoder holds the history's KV, so nothing is read from Redis and nothing is sent (counted on the
gateway's and the decoder's /metrics), and the answers equal those of a gateway that sends every
image with every turn (`--no-lazy-images`) and the parity kit's where it has the case. Then, on a
decoder with a tiny KV cache, a raw client forces the eviction race: the decoder says "held", other
traffic evicts every unpinned block, the client sends the rest, and the answer is still the one an
old client (every byte up front, no lazy_images) gets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from internvl.v1 import decoder_pb2, decoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, tensor_pb2
from services.common.server import channel_options
from tests.conftest import load_kit
from tests.integration.observe import Observed, start_observed
from tests.integration.stack import model_args
from tests.redis_server import RedisServer

KIT = load_kit()
ENCODER = "internvl.v1.VisionEncoder"
BLOCK = 16  # the decoder's default --block-size


def image_bytes(image_id: str) -> bytes:
    return KIT.path(KIT.images[image_id]["file"]).read_bytes()


def new_tokens(case: dict) -> int:
    return case["inputs"]["generation_config"]["max_new_tokens"]


class Gateway:
    def __init__(self, observed: Observed):
        self.observed = observed
        self.channel = grpc.insecure_channel(observed.process.address, options=channel_options())
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.observed.process.stop()

    def chat(self, text: str, images: list[bytes] = (), session_id: str = "",
             max_new_tokens: int = 16) -> gateway_pb2.ChatResponse:
        request = gateway_pb2.ChatRequest(session_id=session_id, text=text,
                                          generation=decoder_pb2.SamplingParams(max_new_tokens=max_new_tokens))
        for data in images:
            request.images.add(data=data)
        return self.stub.Chat(request, timeout=300)

    def new_session(self) -> str:
        return self.stub.CreateSession(gateway_pb2.CreateSessionRequest(), timeout=30).session_id

    def bytes_moved(self) -> dict[str, float]:
        m = self.observed.metrics()
        return {
            "sent_decoder": m.get("ivl_gateway_embedding_sent_bytes_total", hop="decoder"),
            "skipped_decoder": m.get("ivl_gateway_embedding_skipped_bytes_total", hop="decoder"),
            "read_redis": m.get("ivl_gateway_embedding_received_bytes_total", hop="feature_cache"),
            "from_encoder": m.get("ivl_gateway_embedding_received_bytes_total", hop="encoder"),
        }


@dataclass
class Stack:
    redis: RedisServer
    encoder: Observed
    decoder: Observed
    lazy: Gateway
    eager: Gateway  # --no-lazy-images: every image with every turn, as before

    def decoder_bytes(self) -> dict[str, float]:
        m = self.decoder.metrics()
        return {"received": m.get("ivl_decoder_embedding_received_bytes_total"),
                "held": m.get("ivl_decoder_embedding_held_bytes_total")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    started: list = []
    try:
        redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
        started.append(redis)
        encoder = start_observed("services.vision_encoder", model_args(KIT.root), log_level="INFO")
        started.append(encoder.process)
        decoder = start_observed("services.language_decoder", model_args(KIT.root), log_level="INFO")
        started.append(decoder.process)
        gateways = []
        for extra in ([], ["--no-lazy-images"]):
            observed = start_observed("gateway", ["--encoder", encoder.process.address, "--decoder",
                                                  decoder.process.address, "--redis-url", redis.url,
                                                  "--insecure-open", *extra], log_level="INFO")
            started.append(observed.process)
            gateways.append(Gateway(observed))
        yield Stack(redis, encoder, decoder, *gateways)
    finally:
        for item in reversed(started):
            item.stop()


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def embedding_bytes(image_id: str, hidden: int, tokens_per_tile: int) -> int:
    return KIT.image(image_id)["num_tiles"] * tokens_per_tile * hidden * 4  # fp32 on the wire here


def decoder_info(stack: Stack) -> decoder_pb2.DecoderInfo:
    with grpc.insecure_channel(stack.decoder.process.address) as channel:
        return decoder_pb2_grpc.LanguageDecoderStub(channel).GetModelInfo(decoder_pb2.DecoderInfoRequest(), timeout=30)


def test_four_turn_session_moves_no_history_bytes(stack: Stack) -> None:
    round1, round2 = KIT.case("image_round1"), KIT.case("image_round2")
    first_image = round1["inputs"]["images"][0]
    second_image = KIT.smallest_image()["id"]
    info = decoder_info(stack)
    assert info.lazy_images
    size = {i: embedding_bytes(i, info.hidden_size, info.tokens_per_tile) for i in (first_image, second_image)}
    turns = [
        (round1["inputs"]["question"], [image_bytes(first_image)], new_tokens(round1)),
        (round2["inputs"]["question"], [], new_tokens(round2)),
        ("<image>\nAnd this one?", [image_bytes(second_image)], 12),
        ("Compare them.", [], 12),
    ]
    gw = stack.lazy
    session = gw.new_session()
    answers, moved, on_decoder, usages = [], [], [], []
    for text, images, max_new in turns:
        before, dec_before = gw.bytes_moved(), stack.decoder_bytes()
        reply = gw.chat(text, images, session, max_new)
        answers.append(reply.text)
        usages.append(reply.usage)
        moved.append(delta(gw.bytes_moved(), before))
        on_decoder.append(delta(stack.decoder_bytes(), dec_before))

    assert answers[0] == round1["expected"]["responses"][0]
    assert answers[1] == round2["expected"]["responses"][0]
    # Turn 1: the new image is encoded and sent; nothing to skip.
    assert moved[0]["sent_decoder"] == moved[0]["from_encoder"] == size[first_image]
    assert moved[0]["skipped_decoder"] == 0 and on_decoder[0] == {"received": size[first_image], "held": 0}
    # Turn 2 and 4: text only. The history's images stay where they are: not read, not sent.
    for turn, held in ((1, size[first_image]), (3, size[first_image] + size[second_image])):
        assert moved[turn] == {"sent_decoder": 0, "skipped_decoder": held, "read_redis": 0, "from_encoder": 0}, turn
        assert on_decoder[turn] == {"received": 0, "held": held}, turn
    # Turn 3: only the new image moves.
    assert moved[2]["sent_decoder"] == size[second_image] and moved[2]["skipped_decoder"] == size[first_image]
    assert moved[2]["read_redis"] == 0
    # Every turn after the first reuses the KV of its whole history: at least every full block of the
    # previous turn's prompt (re-rendered answer text may re-tokenize differently at the seam).
    for turn in range(1, 4):
        assert usages[turn].cached_prompt_tokens >= usages[turn - 1].prompt_tokens // BLOCK * BLOCK, turn

    # The same session through a gateway that sends every image every turn: the same answers.
    eager_session = stack.eager.new_session()
    before = stack.eager.bytes_moved()
    eager = [stack.eager.chat(text, images, eager_session, max_new).text for text, images, max_new in turns]
    assert eager == answers
    sent = delta(stack.eager.bytes_moved(), before)["sent_decoder"]
    assert sent == 4 * size[first_image] + 2 * size[second_image]  # every image, every turn


def encodes(stack: Stack) -> float:
    return stack.encoder.metrics().rpc(ENCODER, "Encode", "OK")


def test_a_video_with_evicted_frames_is_encoded_once(stack: Stack) -> None:
    """Frame 0 still cached, every other frame evicted: one encoder call for the video, not one per frame."""
    import hashlib

    import redis as redis_py

    from gateway.config import GatewayConfig
    from gateway.core import ChatCore, RequestContext, TilingRequest
    from gateway.sessions import VideoSampling
    from internvl.v1 import vision_pb2, vision_pb2_grpc
    from services.common.limits import DEFAULT_VIDEO_MAX_TILES
    from tests.integration.observe import wait_for_metrics

    video = KIT.manifest["video"]
    data = KIT.path(video["file"]).read_bytes()
    segments, max_tiles = video["load_video_args"]["num_segments"], video["load_video_args"]["max_num"]
    request = gateway_pb2.ChatRequest(text="Describe the video.",
                                      generation=decoder_pb2.SamplingParams(max_new_tokens=8))
    request.video.data, request.video.num_segments, request.tiling.max_tiles = data, segments, max_tiles

    def count_after(expected: float) -> float:
        port = stack.encoder.metrics_port
        return wait_for_metrics(port, lambda m: m.rpc(ENCODER, "Encode", "OK") >= expected).rpc(
            ENCODER, "Encode", "OK")

    before = encodes(stack)
    first = stack.lazy.stub.Chat(request, timeout=300).text
    assert count_after(before + 1) == before + 1
    # The keys the gateway gave the frames (open mode: the anonymous tenant's scope).
    with grpc.insecure_channel(stack.encoder.process.address) as channel:
        info = vision_pb2_grpc.VisionEncoderStub(channel).GetModelInfo(vision_pb2.GetModelInfoRequest(), timeout=30)
    core = ChatCore(GatewayConfig.from_args(["--insecure-open"], env={}), None, None, None, None)
    scope = core.cache_scope(RequestContext(timeout_s=1.0))
    tiling = ChatCore._tiling(TilingRequest(max_tiles=max_tiles), info, DEFAULT_VIDEO_MAX_TILES)
    keys = [ChatCore._frame_key(hashlib.sha256(data).hexdigest(), i, VideoSampling(segments, None, None), tiling,
                                info, scope) for i in range(segments)]
    with redis_py.Redis.from_url(stack.redis.url) as client:
        assert client.exists(*keys) == segments
        assert client.delete(*keys[1:]) == segments - 1
    assert stack.lazy.stub.Chat(request, timeout=300).text == first
    assert count_after(before + 2) == before + 2


# ------------------------------------------------------------------------------ the eviction race


TINY_KV = ["--num-kv-blocks", "96", "--max-model-len", "1024", "--block-size", str(BLOCK)]


@pytest.fixture(scope="module")
def small_decoder() -> Iterator[Observed]:
    decoder = start_observed("services.language_decoder", [*model_args(KIT.root), *TINY_KV], log_level="INFO")
    yield decoder
    decoder.process.stop()


class RawClient:
    """The decoder's Generate protocol spoken by hand, as any client may: old (all bytes up front) or lazy."""

    def __init__(self, address: str):
        self.channel = grpc.aio.insecure_channel(address, options=channel_options())
        self.stub = decoder_pb2_grpc.LanguageDecoderStub(self.channel)

    async def info(self) -> decoder_pb2.DecoderInfo:
        return await self.stub.GetModelInfo(decoder_pb2.DecoderInfoRequest(), timeout=30)


def setup_for(question: str, history: list[tuple[str, str]], images: list[tuple[str, np.ndarray]],
              max_new_tokens: int = 8) -> decoder_pb2.GenerateSetup:
    return decoder_pb2.GenerateSetup(
        conversation=decoder_pb2.Conversation(history=[decoder_pb2.Turn(user=u, assistant=a) for u, a in history],
                                              question=question),
        sampling=decoder_pb2.SamplingParams(max_new_tokens=max_new_tokens),
        images=[decoder_pb2.ImageDescriptor(
            num_tiles=rows.shape[0], feature_key=key,
            tensor=tensor_pb2.TensorHeader(dtype=tensor_pb2.DTYPE_FLOAT32, shape=list(rows.shape),
                                           byte_length=rows.nbytes)) for key, rows in images],
    )


def chunks(rows: np.ndarray, size: int = 1 << 20) -> Iterator[decoder_pb2.GenerateRequest]:
    data = rows.tobytes()
    for i in range(0, len(data), size):
        yield decoder_pb2.GenerateRequest(chunk=data[i:i + size])


async def old_client_answer(client: RawClient, setup: decoder_pb2.GenerateSetup,
                            images: list[np.ndarray]) -> tuple[str, decoder_pb2.Usage]:
    """Every byte up front, no lazy_images: the conversation as older clients speak it."""
    async def requests():
        yield decoder_pb2.GenerateRequest(setup=setup)
        for rows in images:
            for chunk in chunks(rows):
                yield chunk

    text, usage = [], None
    async for response in client.stub.Generate(requests(), timeout=120):
        assert not response.HasField("need_images")
        text.append(response.text)
        if response.finish_reason:
            usage = response.usage
    return "".join(text), usage


async def lazy_answer(call, images: list[np.ndarray], needed: list[int]) -> tuple[str, decoder_pb2.Usage]:
    for i in needed:
        for chunk in chunks(images[i]):
            await call.write(chunk)
    await call.done_writing()
    text, usage = [], None
    while (response := await call.read()) is not grpc.aio.EOF:
        text.append(response.text)
        if response.finish_reason:
            usage = response.usage
    return "".join(text), usage


async def open_lazy(client: RawClient, setup: decoder_pb2.GenerateSetup):
    setup.lazy_images = True
    call = client.stub.Generate(timeout=120)
    await call.write(decoder_pb2.GenerateRequest(setup=setup))
    first = await call.read()
    return call, list(first.need_images.indices)


def test_eviction_between_the_answer_and_admission_changes_nothing(small_decoder: Observed) -> None:
    import asyncio

    async def scenario() -> None:
        client = RawClient(small_decoder.process.address)
        info = await client.info()
        rng = np.random.default_rng(5)

        def image() -> np.ndarray:
            return (rng.standard_normal((1, info.tokens_per_tile, info.hidden_size)) * 0.5).astype(np.float32)

        cat, dog, other = image(), image(), image()
        turn1 = setup_for("<image>\nWhat is this?", [], [("key-cat", cat)])
        first_answer, _ = await old_client_answer(client, turn1, [cat])
        # Another image's KV, to show the flood below evicts what nobody pinned.
        await old_client_answer(client, setup_for("<image>\nAnd this?", [], [("key-other", other)]), [other])

        history = [("<image>\nWhat is this?", first_answer)]
        turn2 = setup_for("<image>\nAnd how does it differ from this one?", history,
                          [("key-cat", cat), ("key-dog", dog)])
        call, needed = await open_lazy(client, turn2)
        assert needed == [1]  # the cat's KV is held (and now pinned), the dog is new

        # The race: long text prompts need every block nobody pins, before turn 2 sends its bytes.
        for i in range(3):
            flood = setup_for(" ".join(f"word{i}x{j}" for j in range(100)), [], [], max_new_tokens=2)
            await old_client_answer(client, flood, [])
        probe, probe_needed = await open_lazy(client, setup_for("<image>\nAnd this?", [], [("key-other", other)]))
        probe.cancel()
        assert probe_needed == [0]  # evicted: only the pin kept the cat's KV

        lazy_text, lazy_usage = await lazy_answer(call, [cat, dog], needed)
        assert lazy_usage.cached_prompt_tokens >= info.tokens_per_tile  # the pinned cat KV served it
        # An old client sending everything (KV of the cat recomputed if need be) gets the same answer.
        old_text, _ = await old_client_answer(client, setup_for(turn2.conversation.question, history,
                                                                [("key-cat", cat), ("key-dog", dog)]), [cat, dog])
        assert lazy_text == old_text
        await client.channel.close()

    asyncio.run(scenario())
    metrics = small_decoder.metrics()
    assert metrics.get("ivl_decoder_embedding_held_images_total") >= 1
    assert metrics.get("ivl_decoder_lazy_image_requests_total") >= 2
