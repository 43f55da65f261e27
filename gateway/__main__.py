"""`python -m gateway`: the public gRPC API in front of the encoder and decoder replicas."""

from __future__ import annotations

import asyncio
import logging
import sys

from gateway.clients import DecoderClient, EncoderClient
from gateway.config import GatewayConfig
from gateway.feature_cache import FeatureCache, redis_client
from gateway.servicer import GatewayServicer
from gateway.sessions import SessionStore
from internvl.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.server import GrpcServer, Service, serve_until_signal


async def run(config: GatewayConfig) -> None:
    redis = redis_client(config.redis_url)
    encoder = EncoderClient(config.encoder_target)
    decoder = DecoderClient(config.decoder_target)
    servicer = GatewayServicer(
        config, encoder, decoder, FeatureCache(redis, config.cache), SessionStore(redis, config.sessions)
    )
    name = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
    server = GrpcServer(config.server, [Service(name, gateway_pb2_grpc.add_GatewayServicer_to_server, servicer)])
    try:
        await serve_until_signal(server)
    finally:
        await encoder.close()
        await decoder.close()
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(GatewayConfig.from_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
