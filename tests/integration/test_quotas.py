"""Quotas per tenant (issue 16 point 3) against real processes: redis-server, encoder, decoder and a
gateway with five named keys and a --quota-file, over gRPC and the OpenAI HTTP API (official client).

Each quota is hit exactly at its limit by one tenant while `dave` (no limits of his own) keeps being
served; live sessions and session bytes are counted in Redis, so a second gateway replica sees the
same counts.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from openai import OpenAI

from gateway.sessions import session_keys
from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.server import channel_options
from tests.conftest import load_kit
from tests.integration.hardening import LONG_GENERATION, LONG_GENERATION_GATEWAY_ARGS
from tests.integration.observe import scrape
from tests.integration.procs import ServiceProcess, free_port
from tests.integration.stack import Stack, start_stack
from tests.integration.test_openai_api import wait_http_ready
from tests.redis_server import command

KIT = load_kit()
KEYS = {"alice": "k-alice-0a1b2c", "bob": "k-bob-3d4e5f", "carol": "k-carol-6a7b8c", "dave": "k-dave-9d0e1f",
        "erin": "k-erin-2a3b4c"}
QUOTAS = {
    "default": {"requests_per_minute": 1000},
    "tenants": {
        "alice": {"requests_per_minute": 3},
        "bob": {"concurrent_requests": 2},
        "carol": {"live_sessions": 2, "session_bytes": 1000, "max_session_ttl_s": 120},
        "erin": {"tokens_per_minute": 60},
        "dave": {},
    },
}
SHORT = decoder_pb2.SamplingParams(max_new_tokens=1)


@dataclass
class QuotaStack:
    stack: Stack
    http_port: int
    metrics_port: int
    gateway: gateway_pb2_grpc.GatewayStub
    keys_file: Path
    quota_file: Path

    def openai(self, tenant: str) -> OpenAI:
        return OpenAI(api_key=KEYS[tenant], base_url=f"http://127.0.0.1:{self.http_port}/v1", max_retries=0)


@pytest.fixture(scope="module")
def quotas(tmp_path_factory) -> Iterator[QuotaStack]:
    workdir = tmp_path_factory.mktemp("quotas")
    keys = workdir / "keys"
    keys.write_text("".join(f"{name}:{key}\n" for name, key in KEYS.items()))
    quota_file = workdir / "quotas.json"
    quota_file.write_text(json.dumps(QUOTAS))
    http_port, metrics_port = free_port(), free_port()
    stack = start_stack(KIT.root, workdir, ["--api-keys-file", str(keys), "--quota-file", str(quota_file),
                                            "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                                            *LONG_GENERATION_GATEWAY_ARGS])
    channel = grpc.insecure_channel(stack.gateway.address, options=channel_options())
    try:
        wait_http_ready(http_port)
        yield QuotaStack(stack, http_port, metrics_port, gateway_pb2_grpc.GatewayStub(channel), keys, quota_file)
    finally:
        channel.close()
        stack.stop()


def auth(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    return err.value


def retry_after_ms(err: grpc.RpcError) -> int | None:
    hint = dict(err.trailing_metadata() or ()).get("retry-after-ms")
    return None if hint is None else int(hint)


def chat(stub, tenant: str, generation=SHORT, **fields) -> gateway_pb2.ChatResponse:
    return stub.Chat(gateway_pb2.ChatRequest(text=fields.pop("text", "Hi"), generation=generation, **fields),
                     metadata=auth(tenant), timeout=300)


def dave_is_served(stub) -> None:
    assert chat(stub, "dave").finish_reason


# ---------------------------------------------------------------------------------------------- rates


def test_the_request_after_the_limit_is_refused_with_a_retry_hint(quotas: QuotaStack) -> None:
    gw = quotas.gateway
    for _ in range(3):
        assert chat(gw, "alice").finish_reason
    err = refused(lambda: chat(gw, "alice"))
    hint = retry_after_ms(err)
    # One request refills in 60 s / 3 = 20 s, less the time the first three took.
    assert hint is not None and 0 < hint <= 20_000, hint
    assert "alice" in err.details() and "3 requests per minute" in err.details()
    refused(lambda: list(gw.ChatStream(gateway_pb2.ChatRequest(text="Hi", generation=SHORT), metadata=auth("alice"),
                                       timeout=60)))
    dave_is_served(gw)

    # The OpenAI front: 429 with Retry-After (seconds) and retry-after-ms.
    client = quotas.openai("alice")
    model = client.models.list().data[0].id
    with pytest.raises(openai.RateLimitError) as http_err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    headers = http_err.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 20 and 0 < int(headers["retry-after-ms"]) <= 20_000
    assert http_err.value.code == "quota_exceeded"
    dave = quotas.openai("dave").chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                         max_tokens=1)
    assert dave.choices[0].finish_reason

    metrics = scrape(quotas.metrics_port)
    assert metrics.get("ivl_gateway_quota_refusals_total", tenant="alice", quota="requests_per_minute") == 3
    assert metrics.get("ivl_gateway_tenant_calls_total", tenant="alice") == 3


def test_generated_tokens_are_reserved_up_front_and_the_unused_part_refunded(quotas: QuotaStack) -> None:
    """erin: 60 tokens a minute (refilling one per second)."""
    gw = quotas.gateway
    # Greedy "Hi" ends after a few tokens: most of the 55 reserved come back.
    used = chat(gw, "erin", decoder_pb2.SamplingParams(max_new_tokens=55)).usage.completion_tokens
    assert 0 < used < 10, used
    # Admitted only because they came back; this one runs all 50 tokens.
    long = decoder_pb2.SamplingParams(max_new_tokens=50, **LONG_GENERATION)
    assert chat(gw, "erin", long).usage.completion_tokens == 50
    # About 10 - used (plus a token a second since) are left: 40 are not there.
    err = refused(lambda: chat(gw, "erin", decoder_pb2.SamplingParams(max_new_tokens=40)))
    hint = retry_after_ms(err)
    assert hint is not None and 0 < hint <= 40_000, hint
    assert "generated tokens per minute" in err.details()
    dave_is_served(gw)


def test_calls_in_progress_are_capped_and_a_batch_is_admitted_whole(quotas: QuotaStack) -> None:
    """bob: two chat calls in progress at most."""
    gw = quotas.gateway
    long = decoder_pb2.SamplingParams(max_new_tokens=3000, **LONG_GENERATION)
    streams = [gw.ChatStream(gateway_pb2.ChatRequest(text="Hi", generation=long), metadata=auth("bob"), timeout=300)
               for _ in range(2)]
    try:
        for stream in streams:
            next(stream)  # both admitted and generating
        err = refused(lambda: chat(gw, "bob"))
        assert retry_after_ms(err) == 1000 and "2 chat calls in progress" in err.details()
        dave_is_served(gw)
        streams[0].cancel()
        # The cancelled call's slot comes back (its settlement runs in the background).
        deadline = time.monotonic() + 60
        while True:
            try:
                assert chat(gw, "bob").finish_reason
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)
        batch = gateway_pb2.BatchChatRequest(requests=[gateway_pb2.ChatRequest(text="Hi", generation=SHORT)] * 3)
        err = refused(lambda: gw.BatchChat(batch, metadata=auth("bob"), timeout=60))
        assert retry_after_ms(err) is None and "at most 2 at once" in err.details()
    finally:
        for stream in streams:
            stream.cancel()


# ---------------------------------------------------------------------------------------------- sessions


def create(gw, tenant: str, system: str | None = None, ttl: int = 0) -> gateway_pb2.Session:
    request = gateway_pb2.CreateSessionRequest(ttl_seconds=ttl)
    if system is not None:
        request.system_message = system
    return gw.CreateSession(request, metadata=auth(tenant), timeout=30)


def delete(gw, tenant: str, session_id: str) -> None:
    gw.DeleteSession(gateway_pb2.DeleteSessionRequest(session_id=session_id), metadata=auth(tenant), timeout=30)


def test_live_sessions_session_bytes_and_ttl_are_capped_across_replicas(quotas: QuotaStack) -> None:
    """carol: two live sessions, 1000 bytes stored, sessions of at most 120 s."""
    gw = quotas.gateway
    stack = quotas.stack
    first = create(gw, "carol", system="x" * 600, ttl=10**6)
    assert first.expires_at_unix <= time.time() + 121  # the TTL asked for was lowered to carol's maximum
    err = refused(lambda: create(gw, "carol", system="y" * 401))  # 1001 bytes: one over
    assert retry_after_ms(err) is None and "1000 bytes stored in sessions" in err.details()
    second = create(gw, "carol", system="y" * 400)  # exactly 1000

    # A second replica shares the counts (they live in the session Redis).
    replica = ServiceProcess("gateway", ["--encoder", stack.encoder.address, "--decoder", stack.decoder.address,
                                         "--redis-url", stack.redis.url, "--api-keys-file", str(quotas.keys_file),
                                         "--quota-file", str(quotas.quota_file)])
    with replica, grpc.insecure_channel(replica.address, options=channel_options()) as channel:
        other = gateway_pb2_grpc.GatewayStub(channel)
        err = refused(lambda: create(other, "carol"))
        assert "2 live sessions" in err.details()
        # Full: a turn is refused before any work (it could not be stored).
        err = refused(lambda: chat(other, "carol", session_id=first.session_id))
        assert "bytes stored in sessions" in err.details()
        create(other, "dave")  # another tenant is unaffected
        delete(other, "carol", second.session_id)
    assert chat(gw, "carol", session_id=first.session_id).finish_reason  # 400 bytes free again
    third = create(gw, "carol")
    err = refused(lambda: create(gw, "carol"))
    assert "2 live sessions" in err.details()

    # An expired session frees its slot and its bytes.
    delete(gw, "carol", third.session_id)
    short = create(gw, "carol", ttl=1)
    refused(lambda: create(gw, "carol"))
    # Watched in Redis itself: a GetSession would restart the session's TTL.
    meta_key = session_keys(short.session_id)[0]
    deadline = time.monotonic() + 30
    while command(stack.redis.port, "EXISTS", meta_key) != b":0\r\n":
        assert time.monotonic() < deadline, "a 1 s session did not expire"
        time.sleep(0.1)
    create(gw, "carol")


def test_concurrent_creates_from_two_replicas_stop_exactly_at_the_limit(quotas: QuotaStack) -> None:
    """Session quotas are one Redis script per check: racing creates through two gateways never pass the limit."""
    stack = quotas.stack
    quota_file = quotas.quota_file.with_name("race.json")
    quota_file.write_text(json.dumps({"tenants": {"alice": {"live_sessions": 5}}}))
    replicas = [ServiceProcess("gateway", ["--encoder", stack.encoder.address, "--decoder", stack.decoder.address,
                                           "--redis-url", stack.redis.url, "--api-keys-file", str(quotas.keys_file),
                                           "--quota-file", str(quota_file)]) for _ in range(2)]
    results: list[str] = []
    with replicas[0], replicas[1]:
        channels = [grpc.insecure_channel(r.address, options=channel_options()) for r in replicas]
        stubs = [gateway_pb2_grpc.GatewayStub(c) for c in channels]
        start = threading.Barrier(12)

        def one(i: int) -> None:
            start.wait()
            try:
                create(stubs[i % 2], "alice")
                results.append("ok")
            except grpc.RpcError as exc:
                results.append(exc.code().name)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for c in channels:
            c.close()
    assert sorted(results) == ["RESOURCE_EXHAUSTED"] * 7 + ["ok"] * 5
