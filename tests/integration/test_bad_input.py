"""Bad input against the real stack: the right status code, a message that says what to fix, no harm.

Every row of the table is sent to the real processes (gateway -> encoder + decoder, Redis), most
through the gateway and a few straight to the encoder or the decoder. Each asserts the status code
and a fragment of the message, then that the next valid request (a fresh image, so the encoder
really runs, and a generation) still succeeds. The decoder runs with `--max-model-len 2048` so
that prompts beyond the context are cheap to build.

Decisions this table pins down:
- limits of the request itself (pixels, aspect ratio, counts, sizes the gateway checks) are
  INVALID_ARGUMENT: retrying never helps, the client must change the request; only a message over
  gRPC's receive limit is RESOURCE_EXHAUSTED, from gRPC itself;
- an animated image is read as its first frame, like upstream's `Image.open(...).convert('RGB')`
  (see `test_animated_image_is_its_first_frame`);
- `max_new_tokens` above the decoder's whole context can never be honoured: INVALID_ARGUMENT; the
  gateway refuses anything above its own cap (--max-new-tokens: the longest generation a drain covers).
"""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from PIL import Image

from gateway.config import MAX_NEW_TOKENS
from internvl.v1 import decoder_pb2, decoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, vision_pb2, vision_pb2_grpc
from services.common.wire import make_header
from tests.conftest import load_kit
from tests.integration.hardening import Stack, chat_request, fresh_image, png, start_stack

KIT = load_kit()
MAX_MODEL_LEN = 2048
INVALID, NOT_FOUND, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
_counter = itertools.count(1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    s = start_stack(KIT.root, tmp_path_factory.mktemp("bad-input"),
                    decoder_args=["--max-model-len", str(MAX_MODEL_LEN)])
    yield s
    s.stop()


@dataclass
class Stubs:
    gateway: gateway_pb2_grpc.GatewayStub
    encoder: vision_pb2_grpc.VisionEncoderStub
    decoder: decoder_pb2_grpc.LanguageDecoderStub


@pytest.fixture(scope="module")
def stubs(stack: Stack) -> Iterator[Stubs]:
    big = 128 << 20  # the client may send more than the gateway accepts: the server must refuse it
    gateway = stack.channel(big)
    encoder, decoder = stack.encoder.channel(), stack.decoder.channel()
    yield Stubs(gateway_pb2_grpc.GatewayStub(gateway), vision_pb2_grpc.VisionEncoderStub(encoder),
                decoder_pb2_grpc.LanguageDecoderStub(decoder))
    for channel in (gateway, encoder, decoder):
        channel.close()


# ------------------------------------------------------------------------------------- inputs


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))
NOISE_PNG = _encoded(NOISE, "PNG")
NOISE_JPEG = _encoded(NOISE, "JPEG")
VIDEO = KIT.path(KIT.manifest["video"]["file"]).read_bytes()


def chat_with_an_image_beyond_the_context(s: Stubs) -> object:
    """The kit's largest image, whose image tokens alone exceed the decoder's context."""
    image = KIT.largest_image()
    tokens = image["num_tiles"] * KIT.manifest["model"]["num_image_token"]
    if tokens <= MAX_MODEL_LEN:
        KIT.lacks(f"image of more than {MAX_MODEL_LEN} image tokens (the largest, {image['id']!r}, has {tokens})")
    return s.gateway.Chat(chat_request(images=[KIT.image_bytes(image)]), timeout=60)


def video_declaring(width: int, height: int) -> bytes:
    """The kit's video with its container (avc1 sample entry) claiming another frame size."""
    data = bytearray(VIDEO)
    stsd = data.index(b"stsd")
    entry = stsd + 4 + 8  # after the box type: version/flags, entry count
    assert data[entry + 4 : entry + 8] == b"avc1"
    struct.pack_into(">HH", data, entry + 32, width, height)
    return bytes(data)


def with_video(data: bytes, **kw) -> gateway_pb2.ChatRequest:
    # 4 frames x 256 tokens fit the 2048-token context (the default 8 fill it, which the gateway refuses
    # before anything else): the check under test, not the context, refuses these requests.
    kw.setdefault("num_segments", 4)
    return gateway_pb2.ChatRequest(text="What happens?", video=vision_pb2.VideoInput(data=data, **kw),
                                   generation=decoder_pb2.SamplingParams(max_new_tokens=4))


def few_tiles(request: gateway_pb2.ChatRequest) -> gateway_pb2.ChatRequest:
    """`request` with at most 4 tiles (+ thumbnail) per image, so its images fit the 2048-token context."""
    request.tiling.max_tiles = 4
    return request


def with_tiling(**kw) -> gateway_pb2.ChatRequest:
    request = chat_request(images=[png(100, 100)])
    request.tiling.CopyFrom(vision_pb2.TilingOptions(**kw))
    return request


def sampling(**kw) -> gateway_pb2.ChatRequest:
    request = chat_request()
    request.generation.MergeFrom(decoder_pb2.SamplingParams(**kw))
    return request


# -------------------------------------------------------------------------------------- calls


def chat(request: gateway_pb2.ChatRequest) -> Callable[[Stubs], object]:
    return lambda s: s.gateway.Chat(request, timeout=60)


def chat_stream(request: gateway_pb2.ChatRequest) -> Callable[[Stubs], object]:
    return lambda s: list(s.gateway.ChatStream(request, timeout=60))


def encode(request: vision_pb2.EncodeRequest) -> Callable[[Stubs], object]:
    return lambda s: list(s.encoder.Encode(request, timeout=60))


def generate(*messages: decoder_pb2.GenerateRequest) -> Callable[[Stubs], object]:
    return lambda s: list(s.decoder.Generate(iter(messages), timeout=60))


def setup(question: str = "Hi", images=(), **sampling_kw) -> decoder_pb2.GenerateRequest:
    return decoder_pb2.GenerateRequest(setup=decoder_pb2.GenerateSetup(
        conversation=decoder_pb2.Conversation(question=question), images=images,
        sampling=decoder_pb2.SamplingParams(max_new_tokens=4, **sampling_kw)))


# The kit model's embedding geometry: image tokens per tile and the language model's hidden size.
TOKENS_PER_TILE, HIDDEN = KIT.manifest["model"]["num_image_token"], KIT.manifest["model"]["llm"]["hidden_size"]


def image_descriptor(num_tiles: int, shape=None) -> decoder_pb2.ImageDescriptor:
    shape = shape or (num_tiles, TOKENS_PER_TILE, HIDDEN)
    return decoder_pb2.ImageDescriptor(num_tiles=num_tiles, tensor=make_header(3, shape))  # 3 = fp32


ONE_TILE_BYTES = TOKENS_PER_TILE * HIDDEN * 4


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Stubs], object]
    code: grpc.StatusCode
    fragment: str


G = gateway_pb2
CASES = [
    # --- images
    Case("corrupt image", chat(chat_request(images=[b"\x89PNG\r\n\x1a\n" + b"\x13" * 500])), INVALID,
         "images[0] could not be decoded"),
    Case("not an image", chat(chat_request(images=[b"%PDF-1.4 hello"])), INVALID, "not a PNG, JPEG, WebP"),
    Case("truncated PNG", chat(chat_request(images=[NOISE_PNG[: len(NOISE_PNG) // 2]])), INVALID,
         "truncated or corrupt"),
    Case("truncated JPEG", chat(chat_request(images=[NOISE_JPEG[: len(NOISE_JPEG) // 2]])), INVALID,
         "truncated or corrupt"),
    Case("unsupported format (PPM)", chat(chat_request(images=[_encoded(NOISE, "PPM")])), INVALID,
         "not a PNG, JPEG, WebP, GIF, BMP or TIFF"),
    Case("unsupported format (ICO)", chat(chat_request(images=[_encoded(NOISE, "ICO")])), INVALID,
         "not a PNG, JPEG, WebP, GIF, BMP or TIFF"),
    Case("bomb over our pixel cap", chat(few_tiles(chat_request(images=[png_header_only(8000, 8000)]))), INVALID,
         "8000x8000 = 64000000 pixels, over the limit"),
    Case("bomb over Pillow's own cap", chat(chat_request(images=[png_header_only(30000, 30000)])), INVALID,
         "over the limit of"),
    Case("zero-size image", chat(chat_request(images=[png_header_only(0, 10)])), INVALID, "could not be decoded"),
    Case("empty image bytes", chat(chat_request(images=[b""])), INVALID, "image 0 is empty"),
    Case("extreme aspect ratio", chat(few_tiles(chat_request(images=[png(2, 1000)]))), INVALID,
         "more elongated than 200:1"),
    Case("too many images", chat(chat_request(images=[png(20, 20)] * 17)), INVALID, "at most 16 per request"),
    Case("image over the byte limit", chat(chat_request(images=[b"\x89PNG" + b"\0" * (21 << 20)])), INVALID,
         "the limit is"),
    Case("message over gRPC's limit", chat(chat_request(images=[b"\0" * (65 << 20)])), EXHAUSTED,
         "larger than max"),
    # --- tiling
    Case("too many tiles", chat(with_tiling(max_tiles=41)), INVALID, "max_tiles <= 40"),
    Case("negative max_tiles", chat(with_tiling(max_tiles=-1)), INVALID, "max_tiles=-1"),
    Case("min_tiles over max_tiles", chat(with_tiling(max_tiles=2, min_tiles=3)), INVALID,
         "min_tiles <= max_tiles"),
    # --- placeholders and text
    Case("<image> count above the images", chat(chat_request("<image> <image> compare", [png(50, 50)])), INVALID,
         "2 <image> placeholder(s) for 1 images"),
    Case("<image> without an image", chat(chat_request("<image> what?")), INVALID, "has no image"),
    Case("<IMG_CONTEXT> typed by the user", chat(chat_request("<IMG_CONTEXT> hi")), INVALID, "<IMG_CONTEXT>"),
    Case("prompt beyond the context (image)", chat_with_an_image_beyond_the_context, INVALID,
         f"context is {MAX_MODEL_LEN}"),
    Case("prompt beyond the context (text)", chat(chat_request("lorem ipsum dolor " * 3000)), INVALID,
         f"context is {MAX_MODEL_LEN}"),
    Case("text over the byte limit", chat(chat_request("x" * (64 * 1024 + 1))), INVALID, "text is longer than"),
    Case("empty request", chat(G.ChatRequest()), INVALID, "no text, image or video"),
    # --- sampling
    Case("negative temperature", chat(sampling(temperature=-1.0)), INVALID, "temperature must be >= 0"),
    Case("NaN temperature", chat(sampling(temperature=float("nan"))), INVALID, "temperature must be a finite"),
    Case("top_p 0", chat(sampling(top_p=0.0)), INVALID, "top_p must be in (0, 1]"),
    Case("top_p above 1", chat(sampling(top_p=1.5)), INVALID, "top_p must be in (0, 1]"),
    Case("negative top_k", chat(sampling(top_k=-1)), INVALID, "top_k must be >= 0"),
    Case("repetition_penalty 0", chat(sampling(repetition_penalty=0.0)), INVALID, "repetition_penalty must be > 0"),
    Case("negative max_new_tokens", chat(sampling(max_new_tokens=-5)), INVALID, "max_new_tokens must be >= 0"),
    Case("max_new_tokens over the gateway's cap", chat(sampling(max_new_tokens=MAX_NEW_TOKENS + 1)), INVALID,
         f"max_new_tokens must be <= {MAX_NEW_TOKENS} (this gateway's --max-new-tokens)"),
    Case("absurd max_new_tokens (decoder)", generate(decoder_pb2.GenerateRequest(setup=decoder_pb2.GenerateSetup(
        conversation=decoder_pb2.Conversation(question="Hi"),
        sampling=decoder_pb2.SamplingParams(max_new_tokens=10**9)))), INVALID,
         f"max_new_tokens must be in [0, {MAX_MODEL_LEN}]"),
    Case("empty stop string", chat(sampling(stop=[""])), INVALID, "stop strings must be non-empty"),
    # --- video
    Case("empty video", chat(with_video(b"")), INVALID, "the video is empty"),
    Case("garbage video", chat(with_video(b"\0\0\0\x18ftypmp42" + b"\x07" * 4000)), INVALID, "video rejected"),
    Case("video frames over the pixel cap", chat(with_video(video_declaring(20000, 20000))), INVALID,
         "20000x20000 = 400000000 pixels, over the limit"),
    Case("too many video segments", chat(with_video(VIDEO, num_segments=65)), INVALID, "num_segments must be in 1..64"),
    Case("reversed video bounds", chat(with_video(VIDEO, start_seconds=2.0, end_seconds=1.0)), INVALID,
         "start_seconds <= end_seconds"),
    Case("video bounds past the end", chat(with_video(VIDEO, start_seconds=500.0, end_seconds=600.0)), INVALID,
         "outside the video"),
    Case("images and a video together", chat(G.ChatRequest(text="hi", images=[vision_pb2.ImageInput(data=png(9, 9))],
                                                            video=vision_pb2.VideoInput(data=VIDEO))),
         INVALID, "not both"),
    # --- sessions and batches
    Case("unknown session (Chat)", chat(G.ChatRequest(session_id="A" * 22, text="hi")), NOT_FOUND, "not found"),
    Case("unknown session (ChatStream)", chat_stream(G.ChatRequest(session_id="nope", text="hi")), NOT_FOUND,
         "not found"),
    Case("unknown session (GetSession)", lambda s: s.gateway.GetSession(G.GetSessionRequest(session_id="B" * 22)),
         NOT_FOUND, "not found"),
    Case("unknown session (DeleteSession)",
         lambda s: s.gateway.DeleteSession(G.DeleteSessionRequest(session_id="C" * 22)), NOT_FOUND, "not found"),
    Case("no session id (GetSession)", lambda s: s.gateway.GetSession(G.GetSessionRequest()), INVALID,
         "session_id is required"),
    Case("negative session TTL", lambda s: s.gateway.CreateSession(G.CreateSessionRequest(ttl_seconds=-5)),
         INVALID, "ttl must be positive"),
    Case("oversized system message",
         lambda s: s.gateway.CreateSession(G.CreateSessionRequest(system_message="s" * 70_000)), INVALID,
         "system_message is longer than"),
    Case("empty batch", lambda s: s.gateway.BatchChat(G.BatchChatRequest()), INVALID, "a batch holds 1.."),
    Case("batch with a session",
         lambda s: s.gateway.BatchChat(G.BatchChatRequest(requests=[G.ChatRequest(session_id="x", text="hi")])),
         INVALID, "cannot use sessions"),
    # --- straight to the encoder
    Case("encoder: no input", encode(vision_pb2.EncodeRequest()), INVALID, "no input"),
    Case("encoder: unknown dtype", encode(vision_pb2.EncodeRequest(
        images=vision_pb2.ImageList(images=[vision_pb2.ImageInput(data=png(30, 30))]), dtype=7)), INVALID,
         "dtype 7 is not supported"),
    # --- straight to the decoder
    Case("decoder: no setup first", generate(decoder_pb2.GenerateRequest(chunk=b"1234")), INVALID,
         "first message must carry the setup"),
    Case("decoder: empty stream", generate(), INVALID, "first message must carry the setup"),
    Case("decoder: wrong embedding shape",
         generate(setup("<image> hi", [image_descriptor(1, (1, TOKENS_PER_TILE - 1, HIDDEN))])), INVALID,
         f"embeddings must have shape [num_tiles, {TOKENS_PER_TILE}, {HIDDEN}]"),
    Case("decoder: embeddings cut short", generate(setup("<image> hi", [image_descriptor(1)]),
                                                   decoder_pb2.GenerateRequest(chunk=b"\0" * 100)),
         INVALID, "the request ended after 0 of 1"),
    Case("decoder: too many tiles", generate(setup("<image> hi", [image_descriptor(1025)])), INVALID,
         "at most 1024 per request"),
    Case("decoder: stop token out of vocabulary", generate(setup(stop_token_ids=[10**6])), INVALID,
         "stop_token_ids must be in"),
    Case("decoder: infinite repetition_penalty", generate(setup(repetition_penalty=float("inf"))), INVALID,
         "repetition_penalty must be a finite"),
]


def next_valid_request_succeeds(s: Stubs) -> None:
    n = next(_counter)
    reply = s.gateway.Chat(chat_request("Describe it.", [fresh_image(n)], max_new_tokens=3), timeout=60)
    assert reply.finish_reason != decoder_pb2.FINISH_REASON_UNSPECIFIED
    assert reply.usage.prompt_tokens > TOKENS_PER_TILE  # the image's tokens are in the prompt: the encoder ran


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(stubs: Stubs, case: Case) -> None:
    with pytest.raises(grpc.RpcError) as err:
        case.call(stubs)
    assert err.value.code() == case.code, err.value.details()
    assert case.fragment in err.value.details()
    next_valid_request_succeeds(stubs)
    if case.id.startswith("decoder:"):  # and the decoder itself, directly
        assert list(stubs.decoder.Generate(iter([setup()]), timeout=60))[-1].finish_reason


def test_animated_image_is_its_first_frame(stubs: Stubs) -> None:
    frames = [Image.new("RGB", (448, 448), color) for color in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    gif = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 3
    first = Image.open(io.BytesIO(gif)).convert("RGB")
    second = Image.open(io.BytesIO(gif))
    second.seek(1)

    def features(data: bytes) -> bytes:
        request = vision_pb2.EncodeRequest(images=vision_pb2.ImageList(images=[vision_pb2.ImageInput(data=data)]))
        return b"".join(m.chunk for m in stubs.encoder.Encode(request, timeout=60) if m.HasField("chunk"))

    assert features(gif) == features(_encoded(first, "PNG"))
    assert features(gif) != features(_encoded(second.convert("RGB"), "PNG"))
    reply = stubs.gateway.Chat(chat_request("What is this?", [gif]), timeout=60)
    assert reply.finish_reason != decoder_pb2.FINISH_REASON_UNSPECIFIED
