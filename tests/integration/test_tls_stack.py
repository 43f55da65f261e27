"""The whole system over TLS, with certificates made in the test.

client --TLS--> gateway --mutual TLS--> encoder, decoder; gateway --TLS + password--> Redis.
The encoder and decoder refuse clients without a certificate from the CA; the gateway refuses
plaintext and calls without an API key (here from IVL_GATEWAY_API_KEYS).
"""

from __future__ import annotations

import io
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis as redis_sync
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from internvl.v1 import decoder_pb2, decoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from services.common.server import channel_options
from tests.conftest import load_kit
from tests.integration.observe import Observed, start_observed
from tests.integration.procs import ServiceProcess, free_port
from tests.integration.stack import model_args
from tests.redis_server import find_redis_server
from tests.tls_certs import Pki, make_pki

KIT = load_kit()
API_KEY = "tls-" + uuid.uuid4().hex
REDIS_PASSWORD = "pw-" + uuid.uuid4().hex


class TlsProcess(ServiceProcess):
    """A service whose health checks (while starting) go over TLS with the given credentials."""

    def __init__(self, module: str, args: Sequence[str], credentials: grpc.ChannelCredentials):
        super().__init__(module, args)
        self.credentials = credentials

    def channel(self, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        return grpc.secure_channel(self.address, self.credentials, options=list(options))


class TlsRedis:
    """redis-server on a TLS-only port with a password."""

    def __init__(self, workdir: Path, pki: Pki):
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "redis.log"
        self.proc = subprocess.Popen(
            [find_redis_server(), "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key),
             "--tls-ca-cert-file", str(pki.ca.cert), "--tls-auth-clients", "no",
             "--requirepass", REDIS_PASSWORD, "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        client = redis_sync.Redis(host="127.0.0.1", port=self.port, password=REDIS_PASSWORD, ssl=True,
                                  ssl_ca_certs=str(pki.ca.cert), socket_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis_sync.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log.read_text(errors="replace") if self.log.exists() else ""
                    self.stop()
                    raise RuntimeError(f"TLS redis-server did not start:\n{log[-2000:]}") from None
                time.sleep(0.05)
        client.close()

    @property
    def url(self) -> str:
        return f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@dataclass
class TlsStack:
    pki: Pki
    encoder: Observed
    decoder: Observed
    gateway: Observed


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[TlsStack]:
    workdir = tmp_path_factory.mktemp("tls")
    pki = make_pki(workdir / "pki")
    ca = pki.ca_bytes
    peer_creds = grpc.ssl_channel_credentials(ca, pki.client.key_bytes, pki.client.cert_bytes)
    client_creds = grpc.ssl_channel_credentials(ca)
    redis = TlsRedis(workdir / "redis", pki)
    mtls = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-ca", str(pki.ca.cert)]
    started: list[Observed] = []
    try:
        for module in ("services.vision_encoder", "services.language_decoder"):
            health = ["--health-port", str(free_port())] if module == "services.language_decoder" else []
            started.append(start_observed(module, [*model_args(KIT.root), *mtls, *health], log_level="INFO",
                                          process=lambda m, a: TlsProcess(m, a, peer_creds)))
        encoder, decoder = started

        def gateway_process(module: str, args: list[str]) -> ServiceProcess:
            proc = TlsProcess(module, args, client_creds)
            proc.env["IVL_GATEWAY_API_KEYS"] = f"other-key,{API_KEY}"
            proc.env["IVL_REDIS_URL"] = redis.url  # it holds the password: never a flag value
            return proc

        started.append(start_observed("gateway", [
            "--encoder", encoder.process.address, "--decoder", decoder.process.address,
            "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
            "--peer-tls-ca", str(pki.ca.cert), "--peer-tls-cert", str(pki.client.cert),
            "--peer-tls-key", str(pki.client.key),
            "--redis-tls-ca", str(pki.ca.cert),
        ], log_level="INFO", process=gateway_process))
        yield TlsStack(pki, encoder, decoder, started[2])
    finally:
        for svc in reversed(started):
            svc.process.stop()
        redis.stop()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _health(address: str, credentials: grpc.ChannelCredentials | None) -> object:
    """SERVING, or the status code of the failed check."""
    channel = (grpc.secure_channel(address, credentials) if credentials is not None
               else grpc.insecure_channel(address))
    with channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError as err:
            return err.code()


def test_chat_over_tls_end_to_end_with_the_cache_in_tls_redis(stack: TlsStack) -> None:
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_bytes)
    with grpc.secure_channel(stack.gateway.process.address, credentials, options=channel_options()) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.ChatRequest(text="Describe the image.",
                                          generation=decoder_pb2.SamplingParams(max_new_tokens=8))
        request.images.add(data=_png())
        request.tiling.max_tiles = 1
        for _ in range(2):
            reply = stub.Chat(request, metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=60)
            assert reply.finish_reason != decoder_pb2.FINISH_REASON_UNSPECIFIED
        with pytest.raises(grpc.RpcError) as err:
            stub.Chat(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    metrics = stack.gateway.metrics()
    # The second request found the first one's features in Redis: TLS and password both worked.
    assert metrics.get("ivl_gateway_feature_cache_hits_total") >= 1
    assert metrics.get("ivl_gateway_feature_cache_errors_total") == 0
    assert REDIS_PASSWORD not in stack.gateway.logs() and API_KEY not in stack.gateway.logs()


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_peers_refuse_clients_without_a_certificate_from_the_ca(stack: TlsStack, which: str) -> None:
    address = getattr(stack, which).process.address
    pki = stack.pki
    serving = health_pb2.HealthCheckResponse.SERVING
    assert _health(address, grpc.ssl_channel_credentials(pki.ca_bytes, pki.client.key_bytes,
                                                         pki.client.cert_bytes)) == serving
    assert _health(address, grpc.ssl_channel_credentials(pki.ca_bytes)) == grpc.StatusCode.UNAVAILABLE
    foreign = grpc.ssl_channel_credentials(pki.ca_bytes, pki.other_client.key_bytes, pki.other_client.cert_bytes)
    assert _health(address, foreign) == grpc.StatusCode.UNAVAILABLE
    assert _health(address, None) == grpc.StatusCode.UNAVAILABLE


def test_gateway_refuses_plaintext(stack: TlsStack) -> None:
    assert _health(stack.gateway.process.address, None) == grpc.StatusCode.UNAVAILABLE
    assert _health(stack.gateway.process.address, grpc.ssl_channel_credentials(stack.pki.ca_bytes)) == (
        health_pb2.HealthCheckResponse.SERVING)


def _fake_generate(channel: grpc.Channel) -> grpc.StatusCode:
    """The attack of issue 16: fake embeddings under some image's key, straight to the decoder."""
    setup = decoder_pb2.GenerateSetup(
        conversation=decoder_pb2.Conversation(question="<image>\nWhat is this?"),
        sampling=decoder_pb2.SamplingParams(max_new_tokens=1),
        images=[decoder_pb2.ImageDescriptor(num_tiles=1, feature_key="victim-image-key")])
    stub = decoder_pb2_grpc.LanguageDecoderStub(channel)
    try:
        list(stub.Generate(iter([decoder_pb2.GenerateRequest(setup=setup)]), timeout=10))
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_decoder_refuses_generate_without_a_certificate(stack: TlsStack) -> None:
    """No certificate, a foreign CA's, or the plaintext health port: the call never reaches Generate."""
    pki, address = stack.pki, stack.decoder.process.address
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(pki.ca_bytes)) as channel:
        assert _fake_generate(channel) == grpc.StatusCode.UNAVAILABLE
    foreign = grpc.ssl_channel_credentials(pki.ca_bytes, pki.other_client.key_bytes, pki.other_client.cert_bytes)
    with grpc.secure_channel(address, foreign) as channel:
        assert _fake_generate(channel) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(address) as channel:
        assert _fake_generate(channel) == grpc.StatusCode.UNAVAILABLE
    # The health-only port answers probes in plaintext, and nothing else.
    health_port = stack.decoder.process.args[stack.decoder.process.args.index("--health-port") + 1]
    health_address = f"127.0.0.1:{health_port}"
    assert _health(health_address, None) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(health_address) as channel:
        assert _fake_generate(channel) == grpc.StatusCode.UNIMPLEMENTED
