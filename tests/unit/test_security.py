"""API keys, secret redaction, and TLS / mutual TLS on a real in-process server (certificates made here)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.peers import make_channel
from services.common.security import (
    ApiKeys,
    ClientTls,
    SecurityConfigError,
    ServerTls,
    load_api_keys,
    redact_url,
)
from services.common.server import GrpcServer, ServerConfig
from tests.compare_digest_spy import CompareDigestSpy, spy_on_compare_digest
from tests.tls_certs import Pki, make_pki

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------------------------------- API keys


def test_keys_from_file_and_env(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# team A\nkey-a\n\n  key-b  \nkey-a\n")
    assert load_api_keys(str(f), "key-c, key-d,,") == ("key-a", "key-b", "key-c", "key-d")
    assert load_api_keys("", "") == ()
    with pytest.raises(SecurityConfigError, match="cannot read --api-keys-file"):
        load_api_keys(str(tmp_path / "missing"))
    with pytest.raises(SecurityConfigError, match="whitespace"):
        load_api_keys("", "has space")


def test_api_keys_check_every_key_and_hide_them() -> None:
    keys = ApiKeys(["alpha-1", "beta-2"])
    assert keys.check("alpha-1") and keys.check("beta-2")
    assert not keys.check("alpha-") and not keys.check("alpha-12") and not keys.check("")
    assert "alpha" not in repr(keys) and len(keys) == 2
    with pytest.raises(SecurityConfigError):
        ApiKeys([])


@pytest.fixture
def compare_digest_spy(monkeypatch: pytest.MonkeyPatch) -> CompareDigestSpy:
    return spy_on_compare_digest(monkeypatch)


@pytest.mark.parametrize("presented", ["alpha-1", "gamma-3", "wrong", ""])
def test_every_key_goes_through_the_constant_time_comparison(compare_digest_spy, presented: str) -> None:
    """Matching or not, the presented key is compared with each configured key, and only in constant time."""
    keys = ApiKeys(["alpha-1", "beta-2", "gamma-3"])
    assert keys.check(presented) is (presented in ("alpha-1", "gamma-3"))
    assert compare_digest_spy.pairs == [(presented.encode(), k) for k in (b"alpha-1", b"beta-2", b"gamma-3")]


def test_key_file_comments_may_be_indented_and_defaults_read_nothing(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("   # indented comment\nkey-a\n")
    assert load_api_keys(str(f)) == ("key-a",)
    assert load_api_keys() == ()
    assert load_api_keys(keys_env="key-b") == ("key-b",)


def test_key_errors_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(SecurityConfigError, match="^API keys must be printable and contain no whitespace$"):
        load_api_keys("", "tab\tkey")
    with pytest.raises(SecurityConfigError, match="^no API keys configured$"):
        ApiKeys([])
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SecurityConfigError, match=f"^--api-keys-file {str(empty)!r} is empty$"):
        load_api_keys(str(empty))
    with pytest.raises(SecurityConfigError, match="^cannot read --api-keys-file .*: No such file or directory$"):
        load_api_keys(str(tmp_path / "missing"))


def test_redact_url() -> None:
    assert redact_url("rediss://user:s3cret@cache.internal:6380/0") == "rediss://user:***@cache.internal:6380/0"
    assert redact_url("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("rediss://user:s3cret@cache.internal/0") == "rediss://user:***@cache.internal/0"  # no port
    assert redact_url("redis://:s3cret@[::1]:6379/0") == "redis://:***@[::1]:6379/0"  # IPv6 keeps its brackets
    assert redact_url("redis://user:s3cret@/0") == "redis://user:***@/0"  # no host
    assert redact_url("redis://user:s3cret@[::1/0") == "<unparseable url>"


def test_nothing_is_unpickled() -> None:
    """No pickle, marshal or torch.load of bytes anyone sends: the wire format is raw tensors."""
    out = subprocess.run(
        ["grep", "-rnE", r"\b(pickle|cPickle|marshal|dill|shelve|torch\.load|numpy\.load|np\.load)\b",
         "--include=*.py", "services", "gateway"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert out.stdout == "", out.stdout


# ---------------------------------------------------------------------------------------- TLS settings


def test_tls_flags_must_be_complete() -> None:
    assert ServerTls.from_flags("", "", "") is None
    assert ServerTls.from_flags("c", "k", "") == ServerTls("c", "k", "") and not ServerTls("c", "k", "").mutual
    assert ServerTls.from_flags("c", "k", "ca") == ServerTls("c", "k", "ca") and ServerTls("c", "k", "ca").mutual
    for bad in [("c", "", ""), ("", "k", ""), ("", "", "ca")]:
        with pytest.raises(SecurityConfigError, match=r"^--tls-cert and --tls-key go together \(and --tls-ca"):
            ServerTls.from_flags(*bad)
    assert ClientTls.from_flags("", "", "") is None
    assert ClientTls.from_flags("ca", "", "") == ClientTls("ca", "", "", "--peer-tls")
    assert ClientTls.from_flags("", "cert", "key", "--x") == ClientTls("", "cert", "key", "--x")
    for bad in [("ca", "cert", ""), ("", "cert", ""), ("", "", "key")]:
        with pytest.raises(SecurityConfigError, match="^--peer-tls-cert and --peer-tls-key go together$"):
            ClientTls.from_flags(*bad)


def test_unreadable_certificate_is_a_clear_error(tmp_path: Path, pki: Pki) -> None:
    missing = str(tmp_path / "none.pem")
    cert, key, ca = str(pki.server.cert), str(pki.server.key), str(pki.ca.cert)
    for tls, flag in [(ServerTls(missing, key), "--tls-cert"), (ServerTls(cert, missing), "--tls-key"),
                      (ServerTls(cert, key, missing), "--tls-ca"),
                      (ClientTls(missing), "--peer-tls-ca"), (ClientTls(ca, missing, key), "--peer-tls-cert"),
                      (ClientTls(ca, cert, missing), "--peer-tls-key"),
                      (ClientTls(missing, flag_prefix="--redis-tls"), "--redis-tls-ca")]:
        with pytest.raises(SecurityConfigError, match=f"^cannot read {flag} "):
            tls.credentials()


def test_client_tls_reads_only_the_files_it_names(pki: Pki) -> None:
    assert ClientTls(str(pki.ca.cert)).credentials() is not None  # no client certificate: none read
    assert ClientTls(cert=str(pki.client.cert), key=str(pki.client.key)).credentials() is not None  # system roots


# ---------------------------------------------------------------------------------------- TLS on the wire


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


async def _serve(tls: ServerTls) -> GrpcServer:
    server = GrpcServer(ServerConfig(port=0, tls=tls), [])
    await server.start()
    await server.set_serving(True)
    return server


def test_tls_server_with_a_verifying_client(pki: Pki) -> None:
    async def main():
        server = await _serve(ServerTls(str(pki.server.cert), str(pki.server.key)))
        try:
            target = f"127.0.0.1:{server.port}"
            async with make_channel(target, credentials=ClientTls(str(pki.ca.cert)).credentials()) as ch:
                ok = await _health(ch)
            async with grpc.aio.insecure_channel(target) as ch:  # plaintext to a TLS port
                with pytest.raises(grpc.aio.AioRpcError) as plain:
                    await _health(ch)
            # A client trusting another CA does not accept this server.
            async with make_channel(target, credentials=ClientTls(str(pki.other_client.cert)).credentials()) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as untrusted:
                    await _health(ch)
            return ok, plain.value.code(), untrusted.value.code()
        finally:
            await server.stop(now=True)

    ok, plain, untrusted = asyncio.run(main())
    assert ok == health_pb2.HealthCheckResponse.SERVING
    assert plain == untrusted == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki: Pki) -> None:
    async def main():
        server = await _serve(ServerTls(str(pki.server.cert), str(pki.server.key), str(pki.ca.cert)))
        try:
            target = f"127.0.0.1:{server.port}"
            results = {}
            for name, tls in {
                "client cert": ClientTls(str(pki.ca.cert), str(pki.client.cert), str(pki.client.key)),
                "no cert": ClientTls(str(pki.ca.cert)),
                "foreign cert": ClientTls(str(pki.ca.cert), str(pki.other_client.cert), str(pki.other_client.key)),
            }.items():
                async with make_channel(target, credentials=tls.credentials()) as ch:
                    try:
                        results[name] = await _health(ch)
                    except grpc.aio.AioRpcError as err:
                        results[name] = err.code()
            return results
        finally:
            await server.stop(now=True)

    results = asyncio.run(main())
    assert results == {
        "client cert": health_pb2.HealthCheckResponse.SERVING,
        "no cert": grpc.StatusCode.UNAVAILABLE,
        "foreign cert": grpc.StatusCode.UNAVAILABLE,
    }
