"""The vision encoder as a real process (`python -m services.vision_encoder`) on the parity kit.

One process per module; every result is checked against the in-process encoder (and, where the kit
has them, the upstream goldens), so the gRPC layer, batching and chunking must be lossless.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from internvl.v1 import tensor_pb2, vision_pb2, vision_pb2_grpc
from services.common.fingerprint import model_fingerprint
from services.common.server import channel_options
from services.common.tensors import tensor_from_wire
from services.common.wire import Reassembler
from services.vision_encoder.model import VisionEncoder, load_vision_encoder
from services.vision_encoder.preprocess import load_image, load_video
from services.vision_encoder.servicer import SERVICE_NAME
from tests.conftest import Kit, in_groups, load_kit
from tests.integration.procs import ServiceProcess

KIT = load_kit()
IMAGES = KIT.manifest["images"]
HIDDEN = KIT.manifest["model"]["llm"]["hidden_size"]
TOKENS = KIT.manifest["model"]["num_image_token"]
TILE_BYTES_FP32 = TOKENS * HIDDEN * 4
LARGEST = max(IMAGES, key=lambda img: img["num_tiles"])
SMALLEST = min(IMAGES, key=lambda img: img["num_tiles"])
MAX_IMAGES = 8
MAX_QUEUED_TILES = MAX_IMAGES * LARGEST["num_tiles"] - 1  # MAX_IMAGES x LARGEST overflows the queue
MAX_PIXELS = max(4_000_000, *(img["size"][0] * img["size"][1] for img in IMAGES))
# Batch-vs-single forward passes differ only by float32 summation order.
SAME = {"atol": 2e-6, "rtol": 1e-5}


@pytest.fixture(scope="module")
def encoder_process() -> Iterator[ServiceProcess]:
    args = [
        "--model", str(KIT.root), "--device", "cpu", "--dtype", "fp32",
        "--chunk-bytes", str(TILE_BYTES_FP32),  # one tile per chunk: multi-tile images span chunks
        "--max-images-per-request", str(MAX_IMAGES),
        "--max-queued-tiles", str(MAX_QUEUED_TILES),
        "--max-batch-tiles", "16",
        "--batch-wait-ms", "20",
        "--max-pixels-per-image", str(MAX_PIXELS),
        "--grace-seconds", "2",
    ]  # fmt: skip
    with ServiceProcess("services.vision_encoder", args, env={"IVL_ENCODER_LOG_LEVEL": "DEBUG"}) as proc:
        yield proc


@pytest.fixture(scope="module")
def channel(encoder_process: ServiceProcess) -> Iterator[grpc.Channel]:
    with encoder_process.channel(channel_options()) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> vision_pb2_grpc.VisionEncoderStub:
    return vision_pb2_grpc.VisionEncoderStub(channel)


@pytest.fixture(scope="module")
def reference() -> VisionEncoder:
    return load_vision_encoder(KIT.root, device="cpu", dtype=torch.float32)


@dataclass
class Item:
    header: vision_pb2.EmbeddingHeader
    features: torch.Tensor
    chunk_sizes: list[int]


def encode(stub: vision_pb2_grpc.VisionEncoderStub, request: vision_pb2.EncodeRequest) -> list[Item]:
    """Reassemble the stream: header, then exactly byte_length bytes of chunks, per item."""
    items: list[Item] = []
    pending: Reassembler | None = None
    for msg in stub.Encode(request, timeout=60):
        assert msg.ByteSize() <= TILE_BYTES_FP32 + 64, "a response message exceeds the chunk size"
        if msg.WhichOneof("part") == "header":
            assert pending is None or pending.complete, "header before the previous item was complete"
            pending = Reassembler(msg.header.tensor)
            items.append(Item(msg.header, torch.empty(0), []))
        else:
            assert pending is not None, "chunk before any header"
            assert pending.feed(msg.chunk) == len(msg.chunk), "more bytes than the header announced"
            items[-1].chunk_sizes.append(len(msg.chunk))
        if pending is not None and pending.complete:
            items[-1].features = tensor_from_wire(pending.header, pending.result())
    assert pending is None or pending.complete, "stream ended mid-item"
    return items


def image_request(*datas: bytes, **kw) -> vision_pb2.EncodeRequest:
    tiling = kw.pop("tiling", None)
    images = vision_pb2.ImageList(images=[vision_pb2.ImageInput(data=d) for d in datas])
    return vision_pb2.EncodeRequest(images=images, tiling=tiling, **kw)


def image_bytes(kit: Kit, image: dict) -> bytes:
    return kit.path(image["file"]).read_bytes()


def expected_features(reference: VisionEncoder, data: bytes, **load_kw) -> torch.Tensor:
    with torch.inference_mode():
        return reference.extract_feature(load_image(data, **load_kw))


def test_health_is_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_lists_the_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


def test_model_info(stub: vision_pb2_grpc.VisionEncoderStub) -> None:
    info = stub.GetModelInfo(vision_pb2.GetModelInfoRequest(), timeout=10)
    assert info.fingerprint == model_fingerprint(KIT.root, "fp32")
    assert info.image_size == KIT.manifest["model"]["image_size"]
    assert info.tokens_per_tile == TOKENS
    assert info.hidden_size == HIDDEN
    assert info.default_max_tiles == KIT.manifest["preprocess"]["max_num"]
    assert info.default_use_thumbnail is KIT.manifest["preprocess"]["use_thumbnail"]
    assert info.dtype == tensor_pb2.DTYPE_FLOAT32


def test_images_match_in_process_encoder_and_goldens(stub, reference) -> None:
    datas = [image_bytes(KIT, img) for img in IMAGES]
    items = []
    for group in in_groups(datas, MAX_IMAGES):  # the kit may have more images than one request carries
        items += encode(stub, image_request(*group))
        assert [it.header.index for it in items[-len(group):]] == list(range(len(group)))
    goldens = {v["image"]: v for v in KIT.manifest.get("vision_features", [])}
    assert goldens.keys() <= {img["id"] for img in IMAGES}, "vision_features goldens for images not in the kit"
    # The upstream comparison runs on the images the kit has goldens for; a kit with none checks nothing.
    assert goldens, f"the parity kit {KIT.root} has no vision_features goldens: nothing to compare with upstream"
    tol = KIT.tolerances["vision_features_fp32"]
    for image, data, item in zip(IMAGES, datas, items, strict=True):
        n = image["num_tiles"]
        assert item.header.num_tiles == n, image["id"]
        assert list(item.header.tensor.shape) == [n, TOKENS, HIDDEN]
        assert item.header.tensor.dtype == tensor_pb2.DTYPE_FLOAT32
        torch.testing.assert_close(item.features, expected_features(reference, data), **SAME)
        if image["id"] in goldens:
            golden = torch.from_numpy(KIT.npy(goldens[image["id"]]["file"]))
            torch.testing.assert_close(item.features, golden, atol=tol["atol"], rtol=tol["rtol"])


def test_large_image_arrives_in_several_chunks(stub) -> None:
    image = KIT.multi_tile_image()
    (item,) = encode(stub, image_request(image_bytes(KIT, image)))
    assert len(item.chunk_sizes) == image["num_tiles"]  # one tile per chunk
    assert max(item.chunk_sizes) <= TILE_BYTES_FP32
    assert sum(item.chunk_sizes) == item.header.tensor.byte_length


def test_requested_wire_dtype(stub, reference) -> None:
    data = image_bytes(KIT, IMAGES[0])
    (item,) = encode(stub, image_request(data, dtype=tensor_pb2.DTYPE_BFLOAT16))
    assert item.header.tensor.dtype == tensor_pb2.DTYPE_BFLOAT16
    assert item.features.dtype == torch.bfloat16
    expected = expected_features(reference, data).to(torch.bfloat16)
    torch.testing.assert_close(item.features.float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_tiling_options(stub, reference) -> None:
    image = KIT.multi_tile_image()
    data = image_bytes(KIT, image)
    one = vision_pb2.TilingOptions(max_tiles=1)
    (item,) = encode(stub, image_request(data, tiling=one))
    assert item.header.num_tiles == 1
    torch.testing.assert_close(item.features, expected_features(reference, data, max_num=1), **SAME)
    no_thumb = vision_pb2.TilingOptions(use_thumbnail=False)
    (item,) = encode(stub, image_request(data, tiling=no_thumb))
    assert item.header.num_tiles == image["num_tiles"] - 1
    torch.testing.assert_close(item.features, expected_features(reference, data, use_thumbnail=False), **SAME)


def test_video_frames_match_manifest_and_in_process_encoder(stub, reference) -> None:
    video = KIT.manifest["video"]
    args = video["load_video_args"]
    data = KIT.path(video["file"]).read_bytes()
    request = vision_pb2.EncodeRequest(
        video=vision_pb2.VideoInput(data=data, num_segments=args["num_segments"])
    )
    items = encode(stub, request)
    assert [it.header.frame_index for it in items] == video["frame_indices"]
    assert [it.header.index for it in items] == list(range(len(items)))
    assert [it.header.num_tiles for it in items] == video["num_patches_list"]
    pixel_values, _ = load_video(data, num_segments=args["num_segments"], max_num=args["max_num"])
    with torch.inference_mode():
        expected = reference.extract_feature(pixel_values)
    torch.testing.assert_close(torch.cat([it.features for it in items]), expected, **SAME)
    # The default segment count is the upstream example's 8.
    default = encode(stub, vision_pb2.EncodeRequest(video=vision_pb2.VideoInput(data=data)))
    assert len(default) == 8


def test_concurrent_requests_get_their_own_results(stub, reference) -> None:
    datas = [image_bytes(KIT, IMAGES[k % len(IMAGES)]) for k in range(8)]
    expected = {k: expected_features(reference, datas[k]) for k in range(min(len(IMAGES), len(datas)))}
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda d: encode(stub, image_request(d)), datas))
    for k, (item,) in enumerate(results):
        torch.testing.assert_close(item.features, expected[k % len(IMAGES)], **SAME)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _bad_requests() -> list[tuple[str, vision_pb2.EncodeRequest, str]]:
    good = image_bytes(KIT, LARGEST)
    small = image_bytes(KIT, SMALLEST)
    video = KIT.path(KIT.manifest["video"]["file"]).read_bytes()
    tiles = vision_pb2.TilingOptions

    def video_request(**kw) -> vision_pb2.EncodeRequest:
        return vision_pb2.EncodeRequest(video=vision_pb2.VideoInput(**kw))

    return [
        ("no input", vision_pb2.EncodeRequest(), "no input"),
        ("no images", vision_pb2.EncodeRequest(images=vision_pb2.ImageList()), "images is empty"),
        ("empty bytes", image_request(good, b""), "images[1].data is empty"),
        ("undecodable image", image_request(b"definitely not an image"), "images[0] could not be decoded"),
        ("truncated image", image_request(good[: len(good) // 2]), "images[0] could not be decoded"),
        ("too many images", image_request(*[small] * (MAX_IMAGES + 1)), f"limit is {MAX_IMAGES}"),
        ("pixel cap", image_request(_png(MAX_PIXELS // 1000 + 1, 1000)), f"over the limit of {MAX_PIXELS}"),
        ("max_tiles high", image_request(good, tiling=tiles(max_tiles=41)), "[1, 40]"),
        ("max_tiles negative", image_request(good, tiling=tiles(max_tiles=-1)), "max_tiles"),
        ("min over max", image_request(good, tiling=tiles(max_tiles=2, min_tiles=3)), "min_tiles"),
        ("bad dtype", image_request(good, dtype=7), "dtype 7 is not supported"),
        ("over queue", image_request(*[good] * MAX_IMAGES), f"limit of {MAX_QUEUED_TILES}"),
        ("empty video", video_request(), "video.data is empty"),
        ("undecodable video", video_request(data=b"\x00" * 4096), "video rejected"),
        ("too many segments", video_request(data=video, num_segments=65), "num_segments"),
        ("reversed bounds", video_request(data=video, start_seconds=2.0, end_seconds=1.0), "start_seconds"),
    ]


BAD = _bad_requests()


@pytest.mark.parametrize(("request_", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_invalid_argument_and_the_service_keeps_serving(stub, request_, message) -> None:
    with pytest.raises(grpc.RpcError) as err:
        encode(stub, request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    (item,) = encode(stub, image_request(image_bytes(KIT, SMALLEST)))
    assert item.header.num_tiles == SMALLEST["num_tiles"]


def test_video_bounds_select_frames(stub) -> None:
    video = KIT.manifest["video"]
    data = KIT.path(video["file"]).read_bytes()
    fps = video["decord"]["avg_fps"]
    request = vision_pb2.EncodeRequest(
        video=vision_pb2.VideoInput(data=data, num_segments=4, start_seconds=0.5, end_seconds=1.5)
    )
    frames = [it.header.frame_index for it in encode(stub, request)]
    assert len(frames) == 4
    assert all(round(0.5 * fps) <= f <= round(1.5 * fps) for f in frames)
    assert frames == sorted(frames)


def test_features_are_finite(stub) -> None:
    (item,) = encode(stub, image_request(image_bytes(KIT, IMAGES[0])))
    assert np.isfinite(item.features.numpy()).all()
