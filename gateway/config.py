"""Gateway configuration: flags with environment defaults, read in this one place."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from gateway.feature_cache import FeatureCacheConfig
from gateway.sessions import SessionConfig
from services.common.server import ServerConfig


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig
    encoder_target: str
    decoder_target: str
    redis_url: str
    cache: FeatureCacheConfig = FeatureCacheConfig()
    sessions: SessionConfig = SessionConfig()
    max_images_per_request: int = 16
    max_image_bytes: int = 20 * 1024 * 1024
    max_video_bytes: int = 64 * 1024 * 1024
    max_text_bytes: int = 64 * 1024
    max_batch_size: int = 64
    # Used when a call has no deadline: nothing waits on a peer forever.
    default_timeout_s: float = 600.0

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> GatewayConfig:
        env = os.environ.get
        p = argparse.ArgumentParser(prog="python -m gateway", description="InternVL2 public gRPC gateway")
        p.add_argument("--host", default=env("IVL_GATEWAY_HOST", "127.0.0.1"))
        p.add_argument("--port", type=int, default=int(env("IVL_GATEWAY_PORT", "50051")))
        p.add_argument("--encoder", default=env("IVL_ENCODER_TARGET", "127.0.0.1:50052"),
                       help="encoder address(es): host:port, ip:port,ip:port, or dns:///name:port")
        p.add_argument("--decoder", default=env("IVL_DECODER_TARGET", "127.0.0.1:50053"),
                       help="decoder address(es), same forms as --encoder")
        p.add_argument("--redis-url", default=env("IVL_REDIS_URL", "redis://127.0.0.1:6379/0"))
        p.add_argument("--feature-ttl", type=float, default=float(env("IVL_FEATURE_TTL_S", "3600")))
        p.add_argument("--session-ttl", type=int, default=int(env("IVL_SESSION_TTL_S", "3600")))
        p.add_argument("--max-images", type=int, default=int(env("IVL_MAX_IMAGES", "16")))
        p.add_argument("--grace", type=float, default=float(env("IVL_GRACE_S", "30")))
        a = p.parse_args(argv)
        return cls(
            server=ServerConfig(host=a.host, port=a.port, grace_seconds=a.grace),
            encoder_target=a.encoder,
            decoder_target=a.decoder,
            redis_url=a.redis_url,
            cache=FeatureCacheConfig(ttl_s=a.feature_ttl),
            sessions=SessionConfig(default_ttl_s=a.session_ttl, max_ttl_s=max(a.session_ttl, 7 * 24 * 3600)),
            max_images_per_request=a.max_images,
        )
