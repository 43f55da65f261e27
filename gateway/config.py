"""Gateway configuration: flags with environment defaults, read in this one place.

Security is on by default: the gateway refuses to start without API keys (`--api-keys-file`,
IVL_GATEWAY_API_KEYS) unless `--insecure-open` says it is a local, open deployment. Keys have no
flag of their own, so they never show in a process listing.

Two Redis stores with two policies: sessions (user data: `noeviction`, append-only file) at
`--session-redis-url`, the feature cache (re-computable: LRU, no persistence) at `--feature-cache-url`.
Each defaults to `--redis-url`, so one Redis still works for trials; sharing one instance is logged as
a warning, because the eviction policy is per instance (LRU would evict sessions, noeviction would
fill up with features). `redis+cluster://` / `rediss+cluster://` URLs name a Redis Cluster.

Redis credentials and TLS go in the URL, as redis-py reads it: `rediss://user:password@host:6380/0`
(`rediss` = TLS; `redis://:password@host` for a password alone); `--redis-tls-ca` names the CA that
signed the Redis servers' certificates (default: the system's roots). A URL with a password is given
in the environment (IVL_REDIS_URL, IVL_SESSION_REDIS_URL, IVL_FEATURE_CACHE_URL): as a flag value it
would show in every process listing, so the gateway refuses to start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gateway.decoder_pool import PoolConfig, ReplicaSource
from gateway.feature_cache import FeatureCacheConfig
from gateway.media import MediaFetchConfig, parse_domains
from gateway.model_specs import ModelSpec, parse_model_specs
from gateway.quota_config import QuotaTable, load_quota_file
from gateway.redis_connect import check_url, instance_address
from gateway.router import SpillRule
from gateway.sessions import SessionConfig
from services.common.argv_secrets import argv_secret_problem
from services.common.flags import EnvFlags
from services.common.logging import LOG_FORMATS
from services.common.security import (
    ANONYMOUS_TENANT,
    ClientTls,
    ServerTls,
    is_loopback_host,
    load_api_keys,
    parse_key_entry,
    redact_url,
)
from services.common.server import ServerConfig

ENV_PREFIX = "IVL_GATEWAY_"
API_KEYS_ENV = "IVL_GATEWAY_API_KEYS"
# Where Redis URLs with a password go: never a flag value (services/common/argv_secrets.py).
REDIS_URL_ENVS = "IVL_REDIS_URL, IVL_SESSION_REDIS_URL or IVL_FEATURE_CACHE_URL"
DEFAULT_METRICS_PORT = 9101
DEFAULT_HTTP_PORT = 8000
DEFAULT_DECODER_TARGET = "127.0.0.1:50053"
MiB = 1024 * 1024
# The longest generation a client may ask for (generation.max_new_tokens), and the slowest decode
# rate per stream the deployment is sized for (InternVL2-8B on the smallest supported GPU with every
# --max-num-seqs slot busy). A drain (--grace-seconds of the decoder and the gateway) must cover
# MAX_NEW_TOKENS / MIN_DECODE_TOKENS_PER_S; tests/deploy/test_manifests.py checks the manifests.
MAX_NEW_TOKENS = 1024
# 1 MiB per call: ~20 MiB/s per upload at a 50 ms round trip, ~1 MiB buffered per keyless call.
RECEIVE_WINDOW_BYTES = MiB
MIN_DECODE_TOKENS_PER_S = 4.0


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP API (gateway/http_server.py); TLS and API keys are the gRPC server's."""

    port: int = DEFAULT_HTTP_PORT  # 0 = no HTTP server
    host: str = ""  # "" = the gRPC host
    served_model_name: str = ""  # "" = the decoder's checkpoint name (e.g. InternVL2-8B)
    max_choices: int = 8  # bound on a request's `n`
    max_body_bytes: int = 96 * MiB  # a request's JSON, base64 media included
    media: MediaFetchConfig = MediaFetchConfig()


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig
    encoder_target: str
    decoder_target: str
    redis_url: str  # the default of both stores; URLs may hold a password: log them redacted
    cache: FeatureCacheConfig = FeatureCacheConfig()
    sessions: SessionConfig = SessionConfig()
    max_images_per_request: int = 16
    max_image_bytes: int = 20 * 1024 * 1024
    max_video_bytes: int = 64 * 1024 * 1024
    max_text_bytes: int = 64 * 1024
    max_batch_size: int = 64
    max_new_tokens: int = MAX_NEW_TOKENS  # requests asking for more are INVALID_ARGUMENT
    # Used when a call has no deadline: nothing waits on a peer forever.
    default_timeout_s: float = 600.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty + insecure_open = no auth
    insecure_open: bool = False
    # Off: the feature cache and the decoder's prefix cache are per tenant (ChatCore.cache_scope).
    share_caches_across_tenants: bool = False
    # On: images go to the decoder only when it asks for them (decoder.proto, lazy_images); off: every
    # image's bytes with every turn, as before (a comparison baseline for tests and benchmarks).
    lazy_images: bool = True
    quotas: QuotaTable = QuotaTable()  # per-tenant limits (--quota-file; gateway/quotas.py)
    peer_tls: ClientTls | None = None  # TLS (and client certificates) towards encoders and decoders
    redis_tls_ca: str = ""
    log_level: str = "INFO"
    log_format: str = "text"
    session_redis_url: str = ""  # "" = redis_url
    feature_cache_url: str = ""  # "" = redis_url
    http: HttpConfig = HttpConfig()
    routing: PoolConfig = PoolConfig()  # decoder replicas: load polling, DNS, the spill rule
    # Several model deployments by served name (--model); empty = one: encoder_target + decoder_target.
    models: tuple[ModelSpec, ...] = ()

    @property
    def model_specs(self) -> tuple[ModelSpec, ...]:
        """Every model this gateway fronts, the default first."""
        return self.models or (ModelSpec(self.http.served_model_name, self.decoder_target, self.encoder_target),)

    def __post_init__(self) -> None:
        if self.api_keys and self.insecure_open:
            raise ValueError(f"--insecure-open contradicts the API keys configured (--api-keys-file, {API_KEYS_ENV})")
        if self.insecure_open:  # open means open to whoever reaches the port: only this machine, then
            for flag, host in (("--host", self.server.host), ("--http-host", self.http.host)):
                if host and not is_loopback_host(host):
                    raise ValueError(f"--insecure-open serves without authentication and so binds loopback only; "
                                     f"{flag} {host} reaches beyond this machine. Give API keys (--api-keys-file or "
                                     f"{API_KEYS_ENV}) or bind 127.0.0.1")
        # frozen: resolve the stores' defaults once, here
        object.__setattr__(self, "session_redis_url", self.session_redis_url or self.redis_url)
        object.__setattr__(self, "feature_cache_url", self.feature_cache_url or self.redis_url)
        check_url(self.session_redis_url, "--session-redis-url (or --redis-url)")
        check_url(self.feature_cache_url, "--feature-cache-url (or --redis-url)")
        if self.redis_tls_ca and not any(urlsplit(u).scheme.startswith("rediss")
                                         for u in (self.session_redis_url, self.feature_cache_url)):
            raise ValueError("--redis-tls-ca needs a rediss:// Redis URL (TLS)")
        if not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise ValueError("--log-level must be a level name (DEBUG, INFO, WARNING, ERROR)")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be >= 1")

    def client_url(self, url: str) -> str:
        """`url` with the TLS CA as redis-py's `ssl_ca_certs` URL option (for rediss:// URLs)."""
        if not self.redis_tls_ca or not urlsplit(url).scheme.startswith("rediss"):
            return url
        parts = urlsplit(url)
        query = [*parse_qsl(parts.query), ("ssl_ca_certs", self.redis_tls_ca)]
        return urlunsplit(parts._replace(query=urlencode(query)))

    @property
    def redis_client_url(self) -> str:
        return self.client_url(self.redis_url)

    @property
    def stores_share_instance(self) -> bool:
        """Sessions and features on one Redis server: one eviction policy for both (trials only)."""
        return instance_address(self.session_redis_url) == instance_address(self.feature_cache_url)

    def summary(self) -> str:
        """The settings worth a start-up log line, secrets left out."""
        auth = "OPEN (no API key)" if self.insecure_open else f"{len(self.api_keys)} API key(s)"
        caches = "shared" if self.share_caches_across_tenants else "per-tenant"
        tls = self.server.tls
        server_tls = "off" if tls is None else ("mutual" if tls.mutual else "on")
        peer_tls = "off" if self.peer_tls is None else ("mutual" if self.peer_tls.cert else "on")
        http = f"http=:{self.http.port}" if self.http.port else "http=off"
        media = ",".join(self.http.media.allowed_domains) or "off"
        tenants = ",".join(parse_key_entry(k)[0] for k in self.api_keys) or ANONYMOUS_TENANT
        quotas = "on" if self.quotas.limits_anything else "off"
        return (f"{self.server.address} {http} media_urls={media} auth={auth} tenants={tenants} quotas={quotas} "
                f"caches={caches} tls={server_tls} {self._models_summary()} peer_tls={peer_tls} "
                f"sessions={redact_url(self.session_redis_url)} features={redact_url(self.feature_cache_url)}")

    def _models_summary(self) -> str:
        if not self.models:
            return f"encoder={self.encoder_target} decoder={self.decoder_target}"
        return "models=" + ";".join(f"{m.name}={m.decoder_target}@{m.encoder_target}" for m in self.models)

    @classmethod
    def from_args(cls, argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> GatewayConfig:
        env = os.environ if env is None else env
        get = env.get
        p = argparse.ArgumentParser(prog="python -m gateway", description="InternVL2 public gRPC gateway")
        p.add_argument("--host", default=get("IVL_GATEWAY_HOST", "127.0.0.1"))
        p.add_argument("--port", type=int, default=int(get("IVL_GATEWAY_PORT", "50051")))
        p.add_argument("--encoder", default=get("IVL_ENCODER_TARGET", "127.0.0.1:50052"),
                       help="encoder address(es): host:port, ip:port,ip:port, or dns:///name:port")
        p.add_argument("--decoder", default=get("IVL_DECODER_TARGET", ""),
                       help="decoder address(es), same forms as --encoder; each turn goes to one replica, chosen "
                            "by KV affinity and load (default 127.0.0.1:50053)")
        p.add_argument("--model", action="append", default=None,
                       metavar="NAME=DECODERS[@ENCODERS]",
                       help="serve a model deployment under NAME (repeat for several; the first is the default; "
                            "without @ENCODERS it uses --encoder); replaces --decoder and --served-model-name "
                            "(env IVL_GATEWAY_MODELS, space-separated)")
        p.add_argument("--redis-url", default=get("IVL_REDIS_URL", "redis://127.0.0.1:6379/0"),
                       help="redis://[[user]:password@]host:port/db, rediss:// for TLS, redis+cluster:// for a "
                            "Redis Cluster: the default of both stores below (env IVL_REDIS_URL)")
        p.add_argument("--session-redis-url", default=get("IVL_SESSION_REDIS_URL", ""),
                       help="the session store: a Redis with maxmemory-policy noeviction and an append-only file "
                            "(default --redis-url; env IVL_SESSION_REDIS_URL)")
        p.add_argument("--feature-cache-url", default=get("IVL_FEATURE_CACHE_URL", ""),
                       help="the feature cache: a Redis with an LRU maxmemory-policy, no persistence needed "
                            "(default --redis-url; env IVL_FEATURE_CACHE_URL)")
        p.add_argument("--feature-ttl", type=float, default=float(get("IVL_FEATURE_TTL_S", "3600")))
        p.add_argument("--session-ttl", type=int, default=int(get("IVL_SESSION_TTL_S", "3600")))
        p.add_argument("--max-session-ttl", type=int, default=int(get("IVL_MAX_SESSION_TTL_S", str(7 * 24 * 3600))),
                       help="longest session TTL a client may ask for; longer requests get this one (per tenant: "
                            "max_session_ttl_s in --quota-file; env IVL_MAX_SESSION_TTL_S)")
        p.add_argument("--max-images", type=int, default=int(get("IVL_MAX_IMAGES", "16")))
        p.add_argument("--grace", "--grace-seconds", dest="grace", type=float, default=float(get("IVL_GRACE_S", "30")),
                       help="time in-flight calls get to finish on SIGTERM (env IVL_GRACE_S)")
        flags = EnvFlags(p, ENV_PREFIX, {}, env)
        flags.add("--api-keys-file", str, f"file of accepted API keys, one per line (also env {API_KEYS_ENV}, "
                  "comma-separated)", default="")
        flags.add_switch("--insecure-open", "serve without API keys (binds loopback only)")
        flags.add_switch("--share-caches-across-tenants", "one feature cache and decoder prefix cache for all API "
                         "keys: more hits, but a tenant can tell from cached_prompt_tokens and latency what "
                         "others sent (single-tenant deployments)")
        flags.add_switch("--no-lazy-images", "send every image's embeddings with every turn, even those whose KV "
                         "the decoder holds (the behaviour before the lazy-images conversation; for comparisons)")
        flags.add("--quota-file", str, "JSON file of per-tenant quotas (requests and tokens per minute, calls in "
                  "progress, live sessions, session bytes, session TTL); see docs/deploy.md. Empty = none",
                  default="")
        flags.add("--receive-window", int, "bytes a gRPC client may send per call before the gateway reads them "
                  "(the HTTP/2 window): what a caller, keyless ones included, can make it buffer per call; a "
                  "stream uploads at most this much per round trip (0 = gRPC's adaptive window)",
                  default=RECEIVE_WINDOW_BYTES)
        flags.add("--tls-cert", str, "PEM certificate chain: serve TLS (with --tls-key)", default="")
        flags.add("--tls-key", str, "PEM private key of --tls-cert", default="")
        flags.add("--tls-ca", str, "PEM CA bundle: require client certificates it signed (mutual TLS)", default="")
        flags.add("--peer-tls-ca", str, "PEM CA that signed the encoders' and decoders' certificates: "
                  "use TLS to them", default="")
        flags.add("--peer-tls-cert", str, "PEM client certificate for mutual TLS to encoders and decoders",
                  default="")
        flags.add("--peer-tls-key", str, "PEM private key of --peer-tls-cert", default="")
        flags.add("--redis-tls-ca", str, "PEM CA of the Redis server's certificate (rediss:// URLs)", default="")
        flags.add("--max-new-tokens", int, "largest generation.max_new_tokens accepted (the drain must cover it: "
                  f"--grace-seconds >= it / {MIN_DECODE_TOKENS_PER_S:g} tokens/s)", default=MAX_NEW_TOKENS)
        flags.add("--metrics-port", int, "Prometheus /metrics port (0 = off)", default=DEFAULT_METRICS_PORT)
        flags.add("--metrics-host", str, "metrics bind address (default: the same as --host)", default="")
        flags.add("--log-level", str, "logging level", default="INFO")
        flags.add("--log-format", str, "log lines as text or JSON (one object per line)", default="text",
                  choices=LOG_FORMATS)
        flags.add("--http-port", int, f"OpenAI-compatible HTTP API port (0 = off; default {DEFAULT_HTTP_PORT})",
                  default=DEFAULT_HTTP_PORT)
        flags.add("--http-host", str, "HTTP bind address (default: the same as --host)", default="")
        flags.add("--served-model-name", str, "model id of the HTTP API (default: the checkpoint directory's "
                  "name, from the decoder)", default="")
        flags.add("--route-load-interval", float, "seconds between load polls (GetLoad) of each decoder replica; "
                  "a replica whose poll fails is routed around until one succeeds", default=1.0)
        flags.add("--route-resolve-interval", float, "seconds between DNS lookups of a dns:/// decoder target",
                  default=5.0)
        flags.add("--route-spill-queue", int, "sequences that may queue on a full decoder replica before new "
                  "turns spill to a less loaded one (gateway/router.py)", default=0)
        flags.add("--route-spill-kv-usage", float, "KV-cache fraction in use at which new turns spill from a "
                  "replica", default=0.9)
        flags.add("--max-choices", int, "largest `n` (choices per HTTP request)", default=8)
        flags.add("--allowed-media-domains", str, "hosts whose http(s) image/video URLs the HTTP API fetches, "
                  "comma-separated (.example.com = its subdomains too); empty = no URL fetching", default="")
        flags.add_switch("--allow-private-media-addresses", "let media URLs resolve to private and loopback "
                         "addresses (an internal image store); link-local and multicast stay refused")
        flags.add("--media-fetch-timeout", float, "seconds one media URL may take, redirects included",
                  default=10.0)
        a = p.parse_args(argv)
        secret = argv_secret_problem(sys.argv[1:] if argv is None else argv, REDIS_URL_ENVS)
        if secret:
            p.error(secret)
        try:
            keys = load_api_keys(a.api_keys_file, get(API_KEYS_ENV, ""))
            if not keys and not a.insecure_open:
                raise ValueError(f"no API keys: give --api-keys-file or {API_KEYS_ENV}, or --insecure-open "
                                 "to serve without authentication (local use only)")
            if not 0 <= a.metrics_port <= 65535:
                raise ValueError("--metrics-port must be in [0, 65535]")
            if not 0 <= a.http_port <= 65535:
                raise ValueError("--http-port must be in [0, 65535]")
            if a.max_choices < 1:
                raise ValueError("--max-choices must be >= 1")
            if a.media_fetch_timeout <= 0:
                raise ValueError("--media-fetch-timeout must be > 0")
            if a.receive_window < 0:
                raise ValueError("--receive-window must be >= 0 (0 = gRPC's adaptive window)")
            if a.session_ttl < 1 or a.max_session_ttl < a.session_ttl:
                raise ValueError("need 1 <= --session-ttl <= --max-session-ttl")
            tenants = [parse_key_entry(k)[0] for k in keys] or [ANONYMOUS_TENANT]
            quotas = load_quota_file(a.quota_file, tenants)
            models = parse_model_specs(a.model or get("IVL_GATEWAY_MODELS", "").split(), a.encoder)
            if models and (a.decoder or a.served_model_name):
                raise ValueError("--model names every decoder and served name: drop --decoder/--served-model-name "
                                 "(IVL_DECODER_TARGET) and give the default model as the first --model")
            for spec in models or (ModelSpec("", a.decoder or DEFAULT_DECODER_TARGET, a.encoder),):
                ReplicaSource.parse(spec.decoder_target)  # a malformed target fails the start, with its reason
            routing = PoolConfig(load_interval_s=a.route_load_interval, resolve_interval_s=a.route_resolve_interval,
                                 spill=SpillRule(spill_queue=a.route_spill_queue,
                                                 spill_kv_usage=a.route_spill_kv_usage))
            return cls(
                server=ServerConfig(host=a.host, port=a.port, grace_seconds=a.grace,
                                    receive_window_bytes=a.receive_window,
                                    tls=ServerTls.from_flags(a.tls_cert, a.tls_key, a.tls_ca),
                                    metrics_port=a.metrics_port, metrics_host=a.metrics_host),
                encoder_target=a.encoder,
                decoder_target=a.decoder or DEFAULT_DECODER_TARGET,
                redis_url=a.redis_url,
                session_redis_url=a.session_redis_url,
                feature_cache_url=a.feature_cache_url,
                cache=FeatureCacheConfig(ttl_s=a.feature_ttl),
                sessions=SessionConfig(default_ttl_s=a.session_ttl, max_ttl_s=a.max_session_ttl),
                max_images_per_request=a.max_images,
                max_new_tokens=a.max_new_tokens,
                api_keys=keys,
                insecure_open=a.insecure_open,
                share_caches_across_tenants=a.share_caches_across_tenants,
                lazy_images=not a.no_lazy_images,
                quotas=quotas,
                peer_tls=ClientTls.from_flags(a.peer_tls_ca, a.peer_tls_cert, a.peer_tls_key),
                redis_tls_ca=a.redis_tls_ca,
                log_level=a.log_level,
                log_format=a.log_format,
                routing=routing,
                models=models,
                http=HttpConfig(
                    port=a.http_port, host=a.http_host, served_model_name=a.served_model_name,
                    max_choices=a.max_choices,
                    media=MediaFetchConfig(allowed_domains=parse_domains(a.allowed_media_domains),
                                           allow_private_addresses=a.allow_private_media_addresses,
                                           timeout_s=a.media_fetch_timeout),
                ),
            )
        except ValueError as exc:  # SecurityConfigError included
            p.error(str(exc))
            raise  # unreachable: p.error exits
