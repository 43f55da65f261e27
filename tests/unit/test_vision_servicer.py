"""VisionEncoderServicer over a real aio server with a fake model: status codes that need timing control.

UNAVAILABLE before the model is attached, RESOURCE_EXHAUSTED when the queue is full, and a client
cancelling a queued request frees its place. (Numerics and input validation are covered against
the real process in tests/integration/test_vision_service.py.)
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from internvl.v1 import tensor_pb2, vision_pb2, vision_pb2_grpc
from services.common.model_config import InternVLConfig
from services.common.server import GrpcServer, Service
from services.vision_encoder.config import EncoderConfig
from services.vision_encoder.servicer import SERVICE_NAME, ModelRuntime, VisionEncoderServicer
from tests.conftest import load_kit

KIT = load_kit()


class GatedForward:
    def __init__(self, hidden: int, tokens: int):
        self.gate = threading.Event()
        self.calls = 0
        self.hidden, self.tokens = hidden, tokens

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert self.gate.wait(timeout=10)
        return torch.full((pixel_values.shape[0], self.tokens, self.hidden), 0.5)


def request() -> vision_pb2.EncodeRequest:
    """One tile whatever the kit's images: the queue below holds exactly one."""
    data = KIT.image_bytes(KIT.smallest_image())
    return vision_pb2.EncodeRequest(images=vision_pb2.ImageList(images=[vision_pb2.ImageInput(data=data)]),
                                    tiling=vision_pb2.TilingOptions(max_tiles=1))


async def collect(stub: vision_pb2_grpc.VisionEncoderStub) -> list[vision_pb2.EncodeResponse]:
    return [msg async for msg in stub.Encode(request(), timeout=20)]


async def until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


def test_unavailable_until_loaded_then_overload_and_cancel() -> None:
    async def body() -> None:
        config = EncoderConfig(model="unused", port=0, max_batch_tiles=1, max_queued_tiles=1, batch_wait_ms=0)
        servicer = VisionEncoderServicer(config)
        server = GrpcServer(
            config.server_config(),
            [Service(SERVICE_NAME, vision_pb2_grpc.add_VisionEncoderServicer_to_server, servicer)],
        )
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = vision_pb2_grpc.VisionEncoderStub(channel)
                for call in (collect(stub), stub.GetModelInfo(vision_pb2.GetModelInfoRequest())):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "loading" in err.value.details()

                mc = InternVLConfig.from_dir(KIT.root)
                fwd = GatedForward(mc.llm.hidden_size, mc.num_image_token)
                servicer.attach(ModelRuntime(fwd, mc, tensor_pb2.DTYPE_FLOAT32, "f00d"))
                batcher = servicer.batcher
                assert batcher is not None

                running = asyncio.ensure_future(collect(stub))
                await until(lambda: fwd.calls == 1)  # in the forward pass, the queue is empty again
                queued = asyncio.ensure_future(collect(stub))
                await until(lambda: batcher.queued_tiles == 1)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await collect(stub)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "queue is full" in err.value.details()

                queued.cancel()  # the client gives up: its tile leaves the queue
                await asyncio.gather(queued, return_exceptions=True)
                await until(lambda: batcher.queued_tiles == 0)
                fwd.gate.set()
                msgs = await running
                assert (
                    msgs[0].header.num_tiles == 1 and msgs[0].header.tensor.dtype == tensor_pb2.DTYPE_FLOAT32
                )
                assert fwd.calls == 1  # the cancelled request never reached the model
                assert len(await collect(stub)) >= 2

                info = await stub.GetModelInfo(vision_pb2.GetModelInfoRequest())
                assert info.fingerprint == "f00d" and info.tokens_per_tile == mc.num_image_token
        finally:
            await servicer.close()
            await server.server.stop(grace=None)

    asyncio.run(asyncio.wait_for(body(), timeout=60))
