"""Tenants apart (issue 16), against real processes: redis-server, encoder, decoder and a gateway with
three API keys (two named, one plain), over gRPC and the OpenAI HTTP API (official `openai` client).

Tenant B tries what a hostile tenant would with tenant A's session id; A's own traffic keeps working.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.server import channel_options
from tests.conftest import load_kit
from tests.integration.procs import REPO_ROOT, ServiceProcess, free_port
from tests.integration.stack import Stack, start_stack
from tests.integration.test_openai_api import wait_http_ready

KIT = load_kit()
KEY_A, KEY_B, KEY_C = "k-alice-7f3e9a", "k-bob-42c1d0", "k-plain-9e8d7c"
SHORT = decoder_pb2.SamplingParams(max_new_tokens=4)


@dataclass
class TenantStack:
    stack: Stack
    http_port: int
    gateway: gateway_pb2_grpc.GatewayStub
    keys_file: Path

    def openai(self, key: str) -> OpenAI:
        return OpenAI(api_key=key, base_url=f"http://127.0.0.1:{self.http_port}/v1", max_retries=0)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory) -> Iterator[TenantStack]:
    workdir = tmp_path_factory.mktemp("tenants")
    keys = workdir / "keys"
    keys.write_text(f"# two named tenants and one plain key\nalice:{KEY_A}\nbob:{KEY_B}\n{KEY_C}\n")
    http_port = free_port()
    stack = start_stack(KIT.root, workdir, ["--api-keys-file", str(keys), "--http-port", str(http_port)])
    channel = grpc.insecure_channel(stack.gateway.address, options=channel_options())
    try:
        wait_http_ready(http_port)
        yield TenantStack(stack, http_port, gateway_pb2_grpc.GatewayStub(channel), keys)
    finally:
        channel.close()
        stack.stop()


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    return err.value.details()


def model_id(t: TenantStack) -> str:
    return t.openai(KEY_A).models.list().data[0].id


# ---------------------------------------------------------------------------------------------- sessions


def test_another_tenant_cannot_read_continue_or_delete_a_session(tenants: TenantStack) -> None:
    gw = tenants.gateway
    sid = gw.CreateSession(gateway_pb2.CreateSessionRequest(system_message="Be brief."), metadata=auth(KEY_A),
                           timeout=30).session_id
    first = gw.Chat(gateway_pb2.ChatRequest(session_id=sid, text="Hello", generation=SHORT), metadata=auth(KEY_A),
                    timeout=120)
    assert first.finish_reason

    # An id nobody has, sharing the shown prefix: another tenant's session must look exactly like it.
    unknown = sid[:6] + ("A" if sid[6] != "A" else "B") * (len(sid) - 6)
    unknown_msg = refused(lambda: gw.GetSession(gateway_pb2.GetSessionRequest(session_id=unknown),
                                                metadata=auth(KEY_A), timeout=30), grpc.StatusCode.NOT_FOUND)
    for key in (KEY_B, KEY_C):
        attempts = [
            lambda k=key: gw.GetSession(gateway_pb2.GetSessionRequest(session_id=sid), metadata=auth(k), timeout=30),
            lambda k=key: gw.Chat(gateway_pb2.ChatRequest(session_id=sid, text="What did they say?",
                                                          generation=SHORT), metadata=auth(k), timeout=120),
            lambda k=key: list(gw.ChatStream(gateway_pb2.ChatRequest(session_id=sid, text="And then?",
                                                                     generation=SHORT), metadata=auth(k),
                                             timeout=120)),
            lambda k=key: gw.DeleteSession(gateway_pb2.DeleteSessionRequest(session_id=sid), metadata=auth(k),
                                           timeout=30),
        ]
        for attempt in attempts:
            assert refused(attempt, grpc.StatusCode.NOT_FOUND) == unknown_msg
    assert sid not in unknown_msg

    # The owner's session is untouched: one turn, continues, then deletes.
    session = gw.GetSession(gateway_pb2.GetSessionRequest(session_id=sid), metadata=auth(KEY_A), timeout=30)
    assert [(t.user, t.assistant) for t in session.turns] == [("Hello", first.text)]
    assert gw.Chat(gateway_pb2.ChatRequest(session_id=sid, text="Again", generation=SHORT), metadata=auth(KEY_A),
                   timeout=120).finish_reason
    gw.DeleteSession(gateway_pb2.DeleteSessionRequest(session_id=sid), metadata=auth(KEY_A), timeout=30)
    assert refused(lambda: gw.GetSession(gateway_pb2.GetSessionRequest(session_id=sid), metadata=auth(KEY_A),
                                         timeout=30), grpc.StatusCode.NOT_FOUND)

    # Session ids are bearer-like: the gateway's logs show a prefix, never the whole id.
    logs = tenants.stack.gateway.output_tail(200_000)
    assert sid[:6] in logs and sid not in logs


# ---------------------------------------------------------------------------------------------- placeholders


def test_placeholders_outside_user_messages_are_refused(tenants: TenantStack) -> None:
    details = refused(lambda: tenants.gateway.CreateSession(
        gateway_pb2.CreateSessionRequest(system_message="Describe <image> carefully."), metadata=auth(KEY_A),
        timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    assert "<image>" in details and "system_message" in details

    client, model = tenants.openai(KEY_A), model_id(tenants)
    for messages, where in (
        ([{"role": "system", "content": "You see <image>."}, {"role": "user", "content": "Hi"}], "messages[0]"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Here: <image>"},
          {"role": "user", "content": "More"}], "messages[1]"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, messages=messages, max_tokens=2)
        assert "<image>" in err.value.message and err.value.param == f"{where}.content"


# ---------------------------------------------------------------------------------------------- request ids


def test_request_ids_are_sanitised_and_unique_per_call(tenants: TenantStack) -> None:
    def grpc_id(given: str) -> str:
        _, call = tenants.gateway.CreateSession.with_call(gateway_pb2.CreateSessionRequest(), timeout=30,
                                                          metadata=(*auth(KEY_A), ("x-request-id", given)))
        return dict(call.initial_metadata())["x-request-id"]

    def http_id(given: str) -> str:
        reply = httpx.get(f"http://127.0.0.1:{tenants.http_port}/v1/models", timeout=30,
                          headers={"authorization": f"Bearer {KEY_A}", "x-request-id": given})
        assert reply.status_code == 200
        return reply.headers["x-request-id"]

    for get_id in (grpc_id, http_id):
        first, second = get_id("client-req-1"), get_id("client-req-1")
        assert first.startswith("client-req-1.") and second.startswith("client-req-1.") and first != second
        for bad in ("has space", "x" * 65, "-leading", "a;b\"c", "a/b?c"):
            made = get_id(bad)
            assert re.fullmatch(r"[0-9a-f]{32}", made), (bad, made)


# ---------------------------------------------------------------------------------------------- binding


@pytest.mark.parametrize("flags", [["--host", "0.0.0.0"], ["--http-host", "0.0.0.0"], ["--host", "10.1.2.3"]])
def test_insecure_open_refuses_a_public_bind(flags: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "gateway", "--insecure-open", *flags], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--insecure-open" in done.stderr and flags[1] in done.stderr and flags[0] in done.stderr


# ---------------------------------------------------------------------------------------------- addresses


def test_client_errors_name_no_internal_address(tenants: TenantStack) -> None:
    """A gateway whose peers are down: the client learns which peer, not where it lives; the log keeps it."""
    dead = free_port()  # nothing listens here
    http_port = free_port()
    redis = tenants.stack.redis
    with ServiceProcess("gateway", ["--encoder", f"127.0.0.1:{dead}", "--decoder", f"127.0.0.1:{dead}",
                                    "--redis-url", redis.url, "--insecure-open",
                                    "--http-port", str(http_port)]) as gw_proc:
        with grpc.insecure_channel(gw_proc.address, options=channel_options()) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            details = refused(lambda: stub.Chat(gateway_pb2.ChatRequest(text="Hi", generation=SHORT), timeout=60),
                              grpc.StatusCode.UNAVAILABLE)
        reply = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=60)
        logs = gw_proc.output_tail(200_000)
    assert "language decoder" in details
    for text in (details, reply.text):
        assert str(dead) not in text and "127.0.0.1" not in text and "ipv4:" not in text, text
    assert reply.status_code == 503
    assert f"127.0.0.1:{dead}" in logs  # operators still see where


# ---------------------------------------------------------------------------------------------- caches


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# A prompt of many prefix-cache blocks that no other test sends.
LONG_TEXT = " ".join(f"item{i} is filed under shelf {i * 7 % 13}." for i in range(60))


def cached_tokens(stub, key: str, text: str, image: bytes | None = None) -> int:
    request = gateway_pb2.ChatRequest(text=text, generation=decoder_pb2.SamplingParams(max_new_tokens=1))
    if image is not None:
        request.images.add(data=image)
        request.tiling.max_tiles = 1
    return stub.Chat(request, metadata=auth(key), timeout=120).usage.cached_prompt_tokens


def probe(stub, seed: int) -> dict[str, int]:
    """A sends an image and a long text twice; then B sends the same: how many prompt tokens came cached."""
    image, text = noise_png(seed), f"{seed}: {LONG_TEXT}"
    out = {}
    for what, kw in (("image", {"text": "What is this?", "image": image}), ("text", {"text": text})):
        cached_tokens(stub, KEY_A, **kw)
        out[f"a_{what}"] = cached_tokens(stub, KEY_A, **kw)  # A's own history: reused
        out[f"b_{what}"] = cached_tokens(stub, KEY_B, **kw)
    return out


def test_caches_are_per_tenant_unless_shared_by_flag(tenants: TenantStack) -> None:
    """cached_prompt_tokens tells B nothing about what A sent (feature keys and the decoder's prefix-cache
    salt are per tenant); a gateway with --share-caches-across-tenants shows the signal."""
    scoped = probe(tenants.gateway, seed=1)
    for what in ("image", "text"):
        assert scoped[f"b_{what}"] < scoped[f"a_{what}"], scoped
    assert scoped["a_text"] > 100, scoped  # the long text's blocks were reused for A itself

    stack = tenants.stack
    shared_gw = ServiceProcess("gateway", ["--encoder", stack.encoder.address, "--decoder", stack.decoder.address,
                                           "--redis-url", stack.redis.url, "--api-keys-file", str(tenants.keys_file),
                                           "--share-caches-across-tenants"])
    with shared_gw, grpc.insecure_channel(shared_gw.address, options=channel_options()) as channel:
        shared = probe(gateway_pb2_grpc.GatewayStub(channel), seed=2)
    for what in ("image", "text"):
        assert shared[f"b_{what}"] == shared[f"a_{what}"], shared  # B sees A's history: the trade-off


def test_sessions_without_an_owner_belong_to_the_anonymous_tenant(tenants: TenantStack) -> None:
    """Sessions stored before owners existed: only the anonymous (--insecure-open) tenant reaches them."""
    import asyncio

    from gateway.redis_connect import redis_client
    from gateway.sessions import LEGACY_OWNER, SessionStore, owner_hash, session_keys

    async def scenario():
        client = redis_client(tenants.stack.redis.url, timeout_s=2.0)
        try:
            store = SessionStore(client)
            sid = (await store.create(system_message="old", owner=owner_hash("alice"))).session_id
            await client.hdel(session_keys(sid)[0], "owner")  # as a session written by an older gateway
            seen = (await store.get(sid, owner=owner_hash("alice")), await store.get(sid, owner=LEGACY_OWNER))
            deleted = (await store.delete(sid, owner=owner_hash("alice")), await store.delete(sid, owner=LEGACY_OWNER))
            return seen, deleted
        finally:
            await client.aclose()

    (alice_view, anonymous_view), deleted = asyncio.run(scenario())
    assert alice_view is None and anonymous_view is not None and anonymous_view.system_message == "old"
    assert deleted == (False, True)
