"""Tenants: API keys with names, the identity the gRPC interceptor hands the servicer, session owners."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import grpc
import pytest

from gateway.sessions import LEGACY_OWNER, owner_hash, session_prefix
from services.common import security
from services.common.interceptors import ApiKeyInterceptor, tenant_of
from services.common.security import (
    ANONYMOUS_TENANT,
    ApiKeys,
    SecurityConfigError,
    derived_key_name,
    load_api_keys,
    parse_key_entry,
)
from services.common.server import GrpcServer, ServerConfig, Service

SERVICE = "test.Whoami"


def test_named_and_plain_key_entries(tmp_path) -> None:
    f = tmp_path / "keys"
    f.write_text("# teams\nalice:k-alice-1\nk-plain-2\n")
    entries = load_api_keys(str(f))
    assert [parse_key_entry(e) for e in entries] == [("alice", "k-alice-1"), (derived_key_name("k-plain-2"),
                                                                              "k-plain-2")]
    name = derived_key_name("k-plain-2")
    assert name == "key-" + hashlib.sha256(b"k-plain-2").hexdigest()[:8]
    assert "k-plain-2" not in name
    assert parse_key_entry("svc.b_1:abc:def") == ("svc.b_1", "abc:def")  # the key may hold a colon when named


@pytest.mark.parametrize("bad", [":nokey-name", "name:", "bad/name:key", "x" * 65 + ":key"])
def test_malformed_entries_fail_at_load(bad: str) -> None:
    with pytest.raises(SecurityConfigError, match="name:key"):
        load_api_keys("", bad)


def test_identify_names_the_key_and_duplicate_names_are_refused() -> None:
    keys = ApiKeys(["alice:k-a", "bob:k-b", "k-c"])
    assert keys.identify("k-a") == "alice" and keys.identify("k-b") == "bob"
    assert keys.identify("k-c") == derived_key_name("k-c")
    assert keys.identify("alice") is None and keys.identify("alice:k-a") is None and keys.identify("") is None
    assert keys.check("k-b") and not keys.check("k-")
    with pytest.raises(SecurityConfigError, match="share a name"):
        ApiKeys(["team:k1", "team:k2"])


def test_every_key_is_compared_in_constant_time(monkeypatch) -> None:
    """No early exit: a match on the first key still compares against all the others."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    keys = ApiKeys(["a:k-1", "b:k-2", "c:k-3"])
    assert keys.identify("k-1") == "a"
    assert calls == [b"k-1", b"k-2", b"k-3"]


def test_session_owner_hash_and_id_prefix() -> None:
    assert owner_hash("alice") != owner_hash("bob") and "alice" not in owner_hash("alice")
    assert owner_hash(ANONYMOUS_TENANT) == LEGACY_OWNER
    sid = "AbCdEf" + "x" * 16
    assert session_prefix(sid) == "AbCdEf..." and "x" not in session_prefix(sid)


def test_interceptor_hands_the_servicer_the_tenant() -> None:
    async def whoami(_request: bytes, context) -> bytes:
        return tenant_of(context, "nobody").encode()

    async def whoami_stream(_request: bytes, context):
        yield tenant_of(context, "nobody").encode()

    def add(_servicer, server: grpc.aio.Server) -> None:
        handlers = {"Unary": grpc.unary_unary_rpc_method_handler(whoami),
                    "Stream": grpc.unary_stream_rpc_method_handler(whoami_stream)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    async def main():
        server = GrpcServer(ServerConfig(port=0), [Service(SERVICE, add, None)],
                            interceptors=[ApiKeyInterceptor(ApiKeys(["alice:k-a", "k-plain"]))])
        port = await server.start()
        await server.set_serving(True)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                unary = channel.unary_unary(f"/{SERVICE}/Unary")
                stream = channel.unary_stream(f"/{SERVICE}/Stream")
                a = await unary(b"", metadata=(("authorization", "Bearer k-a"),))
                plain = await unary(b"", metadata=(("authorization", "Bearer k-plain"),))
                streamed = [m async for m in stream(b"", metadata=(("authorization", "Bearer k-a"),))]
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await unary(b"", metadata=(("authorization", "Bearer k-other"),))
                return a, plain, streamed, refused.value.code()
        finally:
            await server.stop(now=True)

    a, plain, streamed, refused = asyncio.run(main())
    assert a == b"alice" and streamed == [b"alice"]
    assert plain == derived_key_name("k-plain").encode()
    assert refused == grpc.StatusCode.UNAUTHENTICATED


def test_cache_salt_seeds_the_prefix_cache_hash_chain() -> None:
    from services.language_decoder.engine.request import EngineRequest
    from services.language_decoder.engine.sequence import Sequence

    def hashes(salt: bytes) -> list[bytes]:
        seq = Sequence(EngineRequest("r", list(range(1, 33)), cache_salt=salt), arrival=0, block_size=16)
        return [seq.block_hash(0), seq.block_hash(1)]

    a, a_again, b, shared = hashes(b"tenant-a"), hashes(b"tenant-a"), hashes(b"tenant-b"), hashes(b"")
    assert a == a_again
    assert not set(a) & set(b) and not set(a) & set(shared)  # no block of one salt matches another's


def test_feature_keys_are_scoped() -> None:
    from gateway.feature_cache import feature_key_for_hash

    settings = {"max_tiles": 6, "min_tiles": 1, "use_thumbnail": True, "image_size": 448, "model_fingerprint": "m"}
    image = "ab" * 32
    shared = feature_key_for_hash(image, **settings)
    assert feature_key_for_hash(image, **settings, scope="") == shared  # unscoped keys are unchanged
    a, b = (feature_key_for_hash(image, **settings, scope=s) for s in ("scope-a", "scope-b"))
    assert len({shared, a, b}) == 3


# ---------------------------------------------------------------------------------------- point 7, pure parts


def test_request_ids_are_sanitised_and_made_unique_at_the_edge() -> None:
    from services.common.interceptors import assign_request_id

    first, second = (assign_request_id("req-42", unique=True) for _ in range(2))
    assert first.startswith("req-42.") and second.startswith("req-42.") and first != second
    assert assign_request_id("req-42", unique=False) == "req-42"  # internal hops keep the gateway's id
    for bad in ("", "has space", "x" * 65, "-lead", "a;b", "\u00e9"):
        made = assign_request_id(bad, unique=True)
        assert len(made) == 32 and made.isalnum(), bad


def test_client_messages_lose_addresses() -> None:
    from services.common.security import redact_addresses

    grpc_detail = "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.3.7:50053: Connection refused"
    assert "10.0.3.7" not in redact_addresses(grpc_detail) and "50053" not in redact_addresses(grpc_detail)
    redis_detail = "Error 111 connecting to redis-sessions.internvl.svc:6379. Connection refused."
    assert "redis-sessions" not in redact_addresses(redis_detail)
    assert redact_addresses("ipv6:[fd00::5]:50052 down") == "<address> down"
    kept = "the prompt is 3000 tokens; images[0] could not be decoded; [1a] context is 2048 at 12:30"
    assert redact_addresses(kept) == kept


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_hosts(host: str) -> None:
    from services.common.security import is_loopback_host

    assert is_loopback_host(host)
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("::") and not is_loopback_host("gw.example")


def test_insecure_open_refuses_public_binds(capsys) -> None:
    from gateway.config import GatewayConfig

    assert GatewayConfig.from_args(["--insecure-open"], env={}).insecure_open  # loopback by default
    for argv in (["--host", "0.0.0.0"], ["--http-host", "192.168.1.5"]):
        with pytest.raises(SystemExit):
            GatewayConfig.from_args(["--insecure-open", *argv], env={})
        err = capsys.readouterr().err
        assert "--insecure-open" in err and argv[0] in err and argv[1] in err
    keyed = GatewayConfig.from_args(["--host", "0.0.0.0"], env={"IVL_GATEWAY_API_KEYS": "team:k1"})
    assert not keyed.insecure_open and not keyed.share_caches_across_tenants
    assert GatewayConfig.from_args(["--share-caches-across-tenants", "--insecure-open"],
                                   env={}).share_caches_across_tenants


def test_system_and_assistant_placeholders_are_refused_by_the_core() -> None:
    from gateway.config import GatewayConfig
    from gateway.core import ChatCore, ChatError, ChatInput, ErrorKind, PastTurn, UserTurn

    core = ChatCore(GatewayConfig.from_args(["--insecure-open"], env={}), None, None, None, None)
    for request in (ChatInput(UserTurn("Hi"), system_message="See <image>"),
                    ChatInput(UserTurn("Hi"), history=(PastTurn(UserTurn("a"), "b <image>"),))):
        with pytest.raises(ChatError) as err:
            core.validate(request)
        assert err.value.kind is ErrorKind.INVALID_ARGUMENT and "<image>" in err.value.message
