"""Cheap checks before expensive work, against the real processes (issue 16, point 4).

- A conversation whose image tokens alone fill the decoder's context, a `max_new_tokens` beyond that
  context, and stop settings out of range are refused by the gateway before any encode: the encoder's
  own metrics show no Encode call.
- A hostile video (many segments x many tiles from a few KB) is refused by the encoder before its
  frames are tiled, from the container's declared size or after the first decoded frame when the
  container lies; the encoder's peak memory stays flat. Through the gateway it never reaches the encoder.
- A caller that goes away cancels its encode: the gateway cancels the encoder call and the encoder's
  batcher drops the queued tiles (they are never computed).

The encoder waits up to a minute for company before a forward pass (`--batch-wait-ms`), so an encode
is reliably still queued when the test cancels its caller; no test here needs an encode to finish.
"""

from __future__ import annotations

import re
import struct
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc, vision_pb2, vision_pb2_grpc
from tests.conftest import load_kit
from tests.integration.hardening import ENCODER, GATEWAY, Stack, chat_request, fresh_image, png, start_stack

KIT = load_kit()
MAX_MODEL_LEN = 2048
BATCH_WAIT_MS = 60_000
INVALID = grpc.StatusCode.INVALID_ARGUMENT
VIDEO = KIT.path(KIT.manifest["video"]["file"]).read_bytes()
MiB = 1 << 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    s = start_stack(KIT.root, tmp_path_factory.mktemp("cheap-checks"),
                    encoder_args=["--batch-wait-ms", str(BATCH_WAIT_MS), "--max-batch-tiles", "64",
                                  "--max-queued-tiles", "256"],
                    decoder_args=["--max-model-len", str(MAX_MODEL_LEN)],
                    gateway_args=["--max-new-tokens", str(4 * MAX_MODEL_LEN)])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    channel, stub = stack.gateway_stub()
    yield stub
    channel.close()


@pytest.fixture(scope="module")
def encoder(stack: Stack) -> Iterator[vision_pb2_grpc.VisionEncoderStub]:
    channel = stack.encoder.channel([("grpc.max_receive_message_length", 64 * MiB)])
    yield vision_pb2_grpc.VisionEncoderStub(channel)
    channel.close()


# ------------------------------------------------------------------------------------------ observing


def metric_samples(stack: Stack, module: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels` (0 when there is none)."""
    port = stack.metrics_ports[module]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def encode_calls(stack: Stack) -> float:
    """Encode RPCs the encoder has started (finished ones by any status, plus those in flight)."""
    return (metric_samples(stack, ENCODER, "ivl_grpc_requests_total", grpc_method="Encode")
            + metric_samples(stack, ENCODER, "ivl_grpc_requests_in_flight", grpc_method="Encode"))


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM) so far."""
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f}s"
        time.sleep(0.05)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == INVALID, err.value.details()
    return err.value


def video_declaring(width: int, height: int) -> bytes:
    """The kit's video with its container (avc1 sample entry) claiming another frame size."""
    data = bytearray(VIDEO)
    entry = data.index(b"stsd") + 4 + 8
    assert data[entry + 4 : entry + 8] == b"avc1"
    struct.pack_into(">HH", data, entry + 32, width, height)
    return bytes(data)


# ------------------------------------------------------------------------------------------ before any encode


def test_images_beyond_the_context_are_refused_before_any_encode(stack: Stack, gateway) -> None:
    image = KIT.largest_image()
    if image["num_tiles"] * KIT.manifest["model"]["num_image_token"] < MAX_MODEL_LEN:
        KIT.lacks(f"an image of at least {MAX_MODEL_LEN} image tokens")
    before = encode_calls(stack)
    err = refused(lambda: gateway.Chat(chat_request(images=[KIT.image_bytes(image)]), timeout=60))
    assert "images alone are" in err.details() and f"context is {MAX_MODEL_LEN} tokens" in err.details()
    # Small images that add up beyond the context: refused as a whole, none of them encoded.
    many = [fresh_image(9000 + i) for i in range(MAX_MODEL_LEN // KIT.manifest["model"]["num_image_token"] + 1)]
    err = refused(lambda: gateway.Chat(chat_request(images=many), timeout=60))
    assert "images alone are" in err.details()
    assert encode_calls(stack) == before


def test_max_new_tokens_beyond_the_context_is_refused_before_any_encode(stack: Stack, gateway) -> None:
    before = encode_calls(stack)
    err = refused(lambda: gateway.Chat(chat_request(images=[png(64, 64)], max_new_tokens=MAX_MODEL_LEN + 1),
                                       timeout=60))
    assert f"max_new_tokens must be <= {MAX_MODEL_LEN}" in err.details()
    # One shared rule (services/common/limits.py) for stop settings, checked before the encode as well.
    request = chat_request(images=[png(64, 65)])
    request.generation.stop_token_ids.extend(range(65))
    assert "stop_token_ids" in refused(lambda: gateway.Chat(request, timeout=60)).details()
    request = chat_request(images=[png(64, 66)])
    request.generation.stop.extend(["x" * 257])
    assert "stop strings" in refused(lambda: gateway.Chat(request, timeout=60)).details()
    assert encode_calls(stack) == before


# ------------------------------------------------------------------------------------------ hostile video


def hostile_video(data: bytes, segments: int = 32) -> vision_pb2.EncodeRequest:
    """The kit's ~35 KB video asked for many segments of 40-tile frames: 4:3 frames become 13 tiles each."""
    return vision_pb2.EncodeRequest(video=vision_pb2.VideoInput(data=data, num_segments=segments),
                                    tiling=vision_pb2.TilingOptions(max_tiles=40))


def test_hostile_video_is_refused_before_its_frames_are_tiled(stack: Stack, encoder) -> None:
    pid = stack.encoder.proc.pid
    peak = peak_rss_bytes(pid)
    # Declared size honest (320x240): refused before decord opens the file.
    err = refused(lambda: list(encoder.Encode(hostile_video(VIDEO), timeout=60)))
    assert "would be 416 tiles (32 segments" in err.details() and "limit of 256" in err.details()
    # The container claims tiny frames (1 tile each: 32 tiles pass); the first decoded frame shows 13.
    err = refused(lambda: list(encoder.Encode(hostile_video(video_declaring(16, 12)), timeout=60)))
    assert "would be 416 tiles" in err.details()
    # The same request the old encoder decoded and tiled in full: 416 float32 tiles are ~1 GB of pixel
    # values alone. Now at most one frame is decoded (320x240, a few hundred KB).
    assert peak_rss_bytes(pid) - peak < 200 * MiB, "the encoder's peak memory grew"


def test_images_of_too_many_tiles_are_refused_from_their_headers(stack: Stack, encoder) -> None:
    """16 images of 2:1 at max 40 tiles: 19 tiles each, 304 in all; refused before any is decoded."""
    pid = stack.encoder.proc.pid
    peak = peak_rss_bytes(pid)
    request = vision_pb2.EncodeRequest(images=vision_pb2.ImageList(images=[
        vision_pb2.ImageInput(data=png(2000, 1000, (i, 0, 0))) for i in range(16)]),
        tiling=vision_pb2.TilingOptions(max_tiles=40))
    err = refused(lambda: list(encoder.Encode(request, timeout=60)))
    assert "16 image(s) would be 304 tiles" in err.details() and "limit of 256" in err.details()
    assert peak_rss_bytes(pid) - peak < 200 * MiB, "the encoder's peak memory grew"


def test_hostile_video_never_reaches_the_encoder_through_the_gateway(stack: Stack, gateway) -> None:
    before = encode_calls(stack)
    request = gateway_pb2.ChatRequest(text="What happens?", video=vision_pb2.VideoInput(data=VIDEO, num_segments=32),
                                      generation=decoder_pb2.SamplingParams(max_new_tokens=4))
    request.tiling.max_tiles = 40
    err = refused(lambda: gateway.Chat(request, timeout=60))
    assert "would be 416 tiles" in err.details() and "num_segments" in err.details()
    assert encode_calls(stack) == before


# ------------------------------------------------------------------------------------------ cancelled callers


def test_a_cancelled_caller_cancels_its_encode(stack: Stack, gateway) -> None:
    tiles_before = metric_samples(stack, ENCODER, "ivl_encoder_tiles_total")
    cancelled_before = metric_samples(stack, ENCODER, "ivl_grpc_requests_total", grpc_method="Encode",
                                      grpc_code="CANCELLED")
    call = gateway.ChatStream(chat_request(images=[fresh_image(4242)]), timeout=120)
    try:
        # The encode is queued in the batcher, waiting (up to a minute) for company.
        wait_for(lambda: metric_samples(stack, ENCODER, "ivl_encoder_queued_tiles") >= 1, "the encode queued")
        call.cancel()
        wait_for(lambda: metric_samples(stack, ENCODER, "ivl_encoder_queued_tiles") == 0,
                 "the queued tiles dropped", timeout_s=BATCH_WAIT_MS / 3000)
        wait_for(lambda: metric_samples(stack, ENCODER, "ivl_grpc_requests_total", grpc_method="Encode",
                                        grpc_code="CANCELLED") == cancelled_before + 1,
                 "the encoder call cancelled", timeout_s=BATCH_WAIT_MS / 3000)
    finally:
        call.cancel()
    assert metric_samples(stack, GATEWAY, "ivl_gateway_feature_cache_abandoned_total") >= 1
    assert metric_samples(stack, ENCODER, "ivl_encoder_tiles_total") == tiles_before, "the tiles were computed"
