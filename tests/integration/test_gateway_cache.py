"""The gateway's feature cache and sessions, counted at the encoder client.

The encoder and decoder are real processes and Redis is a real redis-server; the gateway runs in
this process so its encoder calls can be counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from gateway.config import GatewayConfig
from gateway.core import ChatCore
from gateway.feature_cache import FeatureCache, redis_client
from gateway.peers import DecoderClient, EncoderClient
from gateway.servicer import GatewayServicer
from gateway.sessions import SessionStore
from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.server import GrpcServer, ServerConfig, Service, channel_options
from tests.conftest import load_kit
from tests.integration.procs import ServiceProcess
from tests.integration.stack import model_args
from tests.redis_server import RedisServer

KIT = load_kit()
GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


class CountingEncoderClient(EncoderClient):
    """The real client, counting the Encode calls that reach the encoder."""

    def __init__(self, target: str):
        super().__init__(target)
        self.calls = 0

    async def encode(self, request, **kwargs):
        self.calls += 1
        return await super().encode(request, **kwargs)


@pytest.fixture(scope="module")
def peers(tmp_path_factory) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    encoder = ServiceProcess("services.vision_encoder", model_args(KIT.root)).start()
    # The decoder's GPU-default warm-up and its single-copy CPU weights, forced on here: the answers
    # below must still equal the kit's goldens after throwaway requests went through the engine.
    decoder = ServiceProcess("services.language_decoder",
                             [*model_args(KIT.root), "--warmup", "on", "--no-cpu-prepacked-weights"]).start()
    yield encoder, decoder
    decoder.stop()
    encoder.stop()


@pytest.fixture
def redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


class Gateway:
    """An in-process gateway server and a client stub, inside one event loop."""

    def __init__(self, peers, redis: RedisServer):
        encoder, decoder = peers
        self.config = GatewayConfig(server=ServerConfig(port=0), encoder_target=encoder.address,
                                    decoder_target=decoder.address, redis_url=redis.url)
        self.encoder = CountingEncoderClient(encoder.address)
        self.redis = redis_client(redis.url)
        self.cache = FeatureCache(self.redis, self.config.cache)
        servicer = GatewayServicer(ChatCore(self.config, self.encoder, DecoderClient(decoder.address), self.cache,
                                            SessionStore(self.redis, self.config.sessions)))
        self.server = GrpcServer(self.config.server,
                                 [Service(GATEWAY, gateway_pb2_grpc.add_GatewayServicer_to_server, servicer)])

    async def __aenter__(self) -> Gateway:
        port = await self.server.start()
        await self.server.set_serving(True)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.server.stop(None)
        await self.redis.aclose()

    async def chat(self, text: str, images: list[bytes] = (), session_id: str = "", max_tiles: int = 0,
                   max_new_tokens: int = 24) -> str:
        request = gateway_pb2.ChatRequest(session_id=session_id, text=text,
                                          generation=decoder_pb2.SamplingParams(max_new_tokens=max_new_tokens))
        for data in images:
            request.images.add(data=data)
        request.tiling.max_tiles = max_tiles
        return (await self.stub.Chat(request, timeout=120)).text


def image_bytes(image_id: str) -> bytes:
    return KIT.path(KIT.images[image_id]["file"]).read_bytes()


def new_tokens(case: dict) -> int:
    return case["inputs"]["generation_config"]["max_new_tokens"]


def run(coro):
    return asyncio.run(coro)


def test_text_only_requests_skip_the_encoder(peers, redis):
    async def main():
        async with Gateway(peers, redis) as gw:
            await gw.chat("Hello, who are you?")
            assert gw.encoder.calls == 0

    run(main())


def test_repeated_image_is_encoded_once(peers, redis):
    case = KIT.case("image_round1")
    (image_id,) = case["inputs"]["images"]
    if KIT.image(image_id)["num_tiles"] < 2:
        KIT.lacks(f"multi-tile image in case image_round1 ({image_id!r} has one tile)")
    max_new_tokens = case["inputs"]["generation_config"]["max_new_tokens"]

    async def main():
        async with Gateway(peers, redis) as gw:
            img = image_bytes(image_id)
            first = await gw.chat(case["inputs"]["question"], [img], max_new_tokens=max_new_tokens)
            second = await gw.chat(case["inputs"]["question"], [img], max_new_tokens=max_new_tokens)
            assert first == second == case["expected"]["responses"][0]
            assert gw.encoder.calls == 1
            assert gw.cache.stats.hits == 1
            # Other tiling settings (one tile instead of several) give other embeddings: a separate cache entry.
            await gw.chat("Describe.", [img], max_tiles=1)
            assert gw.encoder.calls == 2

    run(main())


def test_concurrent_requests_for_a_new_image_share_one_encode(peers, redis):
    async def main():
        async with Gateway(peers, redis) as gw:
            img = image_bytes(KIT.manifest["images"][0]["id"])
            answers = await asyncio.gather(*(gw.chat("What is this?", [img], max_new_tokens=4) for _ in range(8)))
            assert len(set(answers)) == 1
            assert gw.encoder.calls == 1

    run(main())


def test_cache_is_shared_by_gateway_replicas(peers, redis):
    async def main():
        img = image_bytes(KIT.manifest["images"][1]["id"])
        async with Gateway(peers, redis) as one, Gateway(peers, redis) as two:
            await one.chat("Describe.", [img], max_new_tokens=4)
            await two.chat("Describe.", [img], max_new_tokens=4)
            assert (one.encoder.calls, two.encoder.calls) == (1, 0)

    run(main())


def test_follow_up_turn_reuses_features_and_survives_eviction(peers, redis):
    round1, round2 = KIT.case("image_round1"), KIT.case("image_round2")

    async def main():
        async with Gateway(peers, redis) as gw:
            img = image_bytes(round1["inputs"]["images"][0])
            session = await gw.stub.CreateSession(gateway_pb2.CreateSessionRequest())
            await gw.chat(round1["inputs"]["question"], [img], session.session_id, max_new_tokens=new_tokens(round1))
            assert gw.encoder.calls == 1
            # The follow-up sends only text: history and image come from the session, features from Redis.
            assert await gw.chat(round2["inputs"]["question"], session_id=session.session_id,
                                 max_new_tokens=new_tokens(round2)) == round2["expected"]["responses"][0]
            assert gw.encoder.calls == 1
            # Evict every cached feature: the next turn re-encodes from the image bytes the session kept.
            keys = [k async for k in gw.redis.scan_iter(match="ivl:feat:*")]
            assert keys
            await gw.redis.delete(*keys)
            again = await gw.stub.GetSession(gateway_pb2.GetSessionRequest(session_id=session.session_id))
            assert len(again.turns) == 2
            await gw.chat("And the colours?", session_id=session.session_id)
            assert gw.encoder.calls == 2

    run(main())


def test_sessions_are_served_by_any_replica(peers, redis):
    round1, round2 = KIT.case("text_single_round"), KIT.case("text_second_round")

    async def main():
        async with Gateway(peers, redis) as one, Gateway(peers, redis) as two:
            session = await one.stub.CreateSession(gateway_pb2.CreateSessionRequest())
            await one.chat(round1["inputs"]["question"], session_id=session.session_id,
                           max_new_tokens=new_tokens(round1))
            answer = await two.chat(round2["inputs"]["question"], session_id=session.session_id,
                                    max_new_tokens=new_tokens(round2))
            assert answer == round2["expected"]["responses"][0]

    run(main())
