"""The operating conventions of the three real processes, observed from outside.

Health and reflection on every service; an API key on the gateway; a request id made or taken by the
gateway, returned to the client, and found in every service's JSON logs; Prometheus metrics on every
service; a client deadline that reaches the decoder, which frees the sequence; and no API key or
image bytes in any log (all services log at DEBUG here).

The decoder runs with a tiny step budget (observe.SLOW_DECODER_ARGS), so a long prompt takes seconds
of chunked prefill: generation that outlasts a deadline, on a model that otherwise answers at once.
"""

from __future__ import annotations

import base64
import io
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image, PngImagePlugin
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.metrics import RpcMetrics
from services.common.server import channel_options
from tests.conftest import load_kit
from tests.integration.observe import (
    SLOW_DECODER_ARGS,
    MetricMissing,
    Metrics,
    Observed,
    json_logs,
    long_text,
    start_observed,
    wait_for_metrics,
)
from tests.integration.stack import model_args
from tests.redis_server import RedisServer

KIT = load_kit()
API_KEY = "ivl-test-" + uuid.uuid4().hex
PIXEL_MARKER = b"IVL-PIXELS-" + uuid.uuid4().hex.encode()  # inside the image file: must never reach a log
GATEWAY = "internvl.v1.Gateway"
DECODER = "internvl.v1.LanguageDecoder"
ENCODER = "internvl.v1.VisionEncoder"


@dataclass
class Stack:
    redis: RedisServer
    encoder: Observed
    decoder: Observed
    gateway: Observed


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("conventions")
    keys = workdir / "api-keys"
    keys.write_text(f"# one key per line\n{API_KEY}\nsecond-{API_KEY}\n")
    redis = RedisServer(workdir / "redis").start()
    started: list[Observed] = []
    try:
        started.append(start_observed("services.vision_encoder", model_args(KIT.root)))
        started.append(start_observed("services.language_decoder", [*model_args(KIT.root), *SLOW_DECODER_ARGS]))
        encoder, decoder = started
        peers = ["--encoder", encoder.process.address, "--decoder", decoder.process.address]
        started.append(start_observed("gateway", [*peers, "--redis-url", redis.url, "--api-keys-file", str(keys)]))
        yield Stack(redis, encoder, decoder, started[2])
    finally:
        for svc in reversed(started):
            svc.process.stop()
        redis.stop()


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    channel = grpc.insecure_channel(stack.gateway.process.address, options=channel_options())
    yield gateway_pb2_grpc.GatewayStub(channel)
    channel.close()


def _key(key: str = API_KEY) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def marked_png() -> bytes:
    """A small noise image whose file carries PIXEL_MARKER in a text chunk."""
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", PIXEL_MARKER.decode())
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _chat_request(text: str = "Describe the image.", image: bytes | None = None,
                  max_new_tokens: int = 8) -> gateway_pb2.ChatRequest:
    request = gateway_pb2.ChatRequest(text=text, generation=decoder_pb2.SamplingParams(max_new_tokens=max_new_tokens))
    if image is not None:
        request.images.add(data=image)
        request.tiling.max_tiles = 1
    return request


# ---------------------------------------------------------------------------------------- the metric reader


def test_metric_reader_fails_on_a_missing_metric() -> None:
    """`== 0` checks below must not pass because a metric was renamed or never exported."""
    registry = CollectorRegistry()
    RpcMetrics(registry)
    Gauge("ivl_decoder_active_sequences", "x", registry=registry).set(0)
    scraped = Metrics(generate_latest(registry).decode())
    assert scraped.get("ivl_decoder_active_sequences") == 0
    assert scraped.rpc(GATEWAY, "Chat", "OK") == 0  # exported, no call with these labels yet
    for name, labels in [("ivl_decoder_active_sequence", {}), ("ivl_decoder_kv_cache_used_blocks", {}),
                         ("ivl_grpc_request_total", {"grpc_service": GATEWAY})]:
        with pytest.raises(MetricMissing, match=name):
            scraped.get(name, **labels)


# ---------------------------------------------------------------------------------------- health, reflection


@pytest.mark.parametrize(("which", "service"), [("encoder", ENCODER), ("decoder", DECODER), ("gateway", GATEWAY)])
def test_health_and_reflection_on_every_service(stack: Stack, which: str, service: str) -> None:
    """Open on the gateway too: probes and tools carry no API key."""
    with grpc.insecure_channel(getattr(stack, which).process.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        replies = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


# ---------------------------------------------------------------------------------------- API key


@pytest.mark.parametrize(
    ("metadata", "message"),
    [((), "missing API key"), (_key("not-a-key"), "invalid API key"), ((("authorization", API_KEY),), "Bearer")],
)
def test_gateway_requires_an_api_key(stack: Stack, gateway, metadata, message: str) -> None:
    for call in (lambda: gateway.Chat(_chat_request("Hi"), metadata=metadata, timeout=30),
                 lambda: list(gateway.ChatStream(_chat_request("Hi"), metadata=metadata, timeout=30)),
                 lambda: gateway.CreateSession(gateway_pb2.CreateSessionRequest(), metadata=metadata, timeout=30)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and message in err.value.details()
    assert stack.gateway.metrics().rpc(GATEWAY, "Chat", "UNAUTHENTICATED") >= 1


def test_every_configured_key_works(gateway) -> None:
    for key in (API_KEY, f"second-{API_KEY}"):
        assert gateway.Chat(_chat_request("Hi"), metadata=_key(key), timeout=60).finish_reason


# ---------------------------------------------------------------------------------------- request ids, metrics


def _ids_in_logs(svc: Observed) -> set[str]:
    return {e["request_id"] for e in json_logs(svc.logs()) if "request_id" in e}


def test_request_id_reaches_every_service_and_returns_to_the_client(stack: Stack, gateway) -> None:
    given = "itest-" + uuid.uuid4().hex
    reply, call = gateway.Chat.with_call(_chat_request(image=marked_png()), timeout=60,
                                         metadata=(*_key(), ("x-request-id", given)))
    returned = dict(call.initial_metadata())["x-request-id"]
    # The client's id is kept as a prefix; the gateway's suffix makes it unique per call (issue 16).
    assert reply.finish_reason and returned.startswith(given + ".") and returned != given
    given = returned

    # Without one, the gateway makes one, returns it, and forwards it.
    _, call = gateway.Chat.with_call(_chat_request("Hello"), metadata=_key(), timeout=60)
    made = dict(call.initial_metadata())["x-request-id"]
    assert made and made != given

    for svc in (stack.gateway, stack.encoder, stack.decoder):
        assert given in _ids_in_logs(svc), svc.process.module
    assert made in _ids_in_logs(stack.gateway) and made in _ids_in_logs(stack.decoder)
    access = [e for e in json_logs(stack.decoder.logs()) if e.get("request_id") == given]
    assert any(f"{DECODER}/Generate OK" in e["message"] for e in access)


def test_metrics_on_every_service(stack: Stack, gateway) -> None:
    image = marked_png()
    for _ in range(2):  # the second is a feature-cache hit
        gateway.Chat(_chat_request(image=image), metadata=_key(), timeout=60)
    gw, enc, dec = stack.gateway.metrics(), stack.encoder.metrics(), stack.decoder.metrics()

    assert gw.rpc(GATEWAY, "Chat", "OK") >= 2
    assert gw.get("ivl_grpc_request_duration_seconds_count", grpc_service=GATEWAY, grpc_method="Chat",
                  grpc_code="OK") >= 2
    assert gw.get("ivl_gateway_feature_cache_misses_total") >= 1
    assert gw.get("ivl_gateway_feature_cache_hits_total") >= 1
    assert gw.get("ivl_gateway_feature_cache_written_bytes_total") > 0
    assert gw.get("ivl_gateway_feature_cache_read_bytes_total") > 0
    assert gw.get("process_resident_memory_bytes") > 0

    assert enc.rpc(ENCODER, "Encode", "OK") >= 1
    assert enc.get("ivl_encoder_queued_tiles") == 0
    assert enc.get("ivl_encoder_batch_tiles_count") >= 1 and enc.get("ivl_encoder_tiles_total") >= 1

    assert dec.rpc(DECODER, "Generate", "OK") >= 2
    assert dec.get("ivl_grpc_first_response_seconds_count", grpc_service=DECODER, grpc_method="Generate") >= 2
    assert dec.get("ivl_decoder_generated_tokens_total") > 0
    assert dec.get("ivl_decoder_active_sequences") == 0
    assert 0 <= dec.get("ivl_decoder_kv_cache_usage_ratio") <= 1 and dec.get("ivl_decoder_kv_cache_blocks") > 0


# ---------------------------------------------------------------------------------------- deadlines


def _ended(metrics, service: str, method: str) -> float:
    """Calls of the method that ended by deadline or cancellation."""
    return metrics.rpc(service, method, "DEADLINE_EXCEEDED") + metrics.rpc(service, method, "CANCELLED")


def test_client_deadline_reaches_the_decoder_which_frees_the_sequence(stack: Stack, gateway) -> None:
    before = stack.decoder.metrics()
    ended_before = _ended(before, DECODER, "Generate")
    outcome: dict[str, object] = {}

    def chat() -> None:
        try:
            list(gateway.ChatStream(_chat_request(long_text().text, max_new_tokens=64), metadata=_key(), timeout=1.5))
            outcome["code"] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            outcome["code"] = err.code()

    caller = threading.Thread(target=chat)
    caller.start()
    # The sequence is admitted and holds KV blocks while its prompt is prefilled...
    running = wait_for_metrics(stack.decoder.metrics_port,
                               lambda m: m.get("ivl_decoder_active_sequences") == 1, timeout_s=10)
    assert running.get("ivl_decoder_kv_cache_used_blocks") > 0
    caller.join(30)
    assert outcome["code"] == grpc.StatusCode.DEADLINE_EXCEEDED

    # ...and once the deadline passes the decoder drops it and frees its blocks.
    after = wait_for_metrics(stack.decoder.metrics_port, lambda m: (
        m.get("ivl_decoder_active_sequences") == 0 and m.get("ivl_decoder_waiting_sequences") == 0
        and m.get("ivl_decoder_kv_cache_used_blocks") == 0 and _ended(m, DECODER, "Generate") > ended_before))
    assert after.get("ivl_decoder_active_sequences") == 0 and after.get("ivl_decoder_waiting_sequences") == 0
    assert after.get("ivl_decoder_kv_cache_used_blocks") == 0
    assert _ended(after, DECODER, "Generate") == ended_before + 1
    # The prompt was never finished: work stopped, it did not run on unobserved.
    prompt_tokens = after.get("ivl_decoder_prompt_tokens_total") - before.get("ivl_decoder_prompt_tokens_total")
    assert prompt_tokens < long_text().tokens * 0.75
    # Which side notices first (the deadline, or the cancel it causes) is a race: either code is right.
    gw = wait_for_metrics(stack.gateway.metrics_port, lambda m: _ended(m, GATEWAY, "ChatStream") >= 1)
    assert _ended(gw, GATEWAY, "ChatStream") >= 1
    # The decoder is fine afterwards.
    assert gateway.Chat(_chat_request("Hello"), metadata=_key(), timeout=60).finish_reason


# ---------------------------------------------------------------------------------------- secrets in logs


def test_no_api_key_or_image_bytes_in_any_log(stack: Stack, gateway) -> None:
    image = marked_png()
    gateway.Chat(_chat_request(image=image), metadata=_key(), timeout=60)
    with pytest.raises(grpc.RpcError):
        gateway.Chat(_chat_request(image=image), metadata=_key("wrong-" + API_KEY), timeout=60)
    with pytest.raises(grpc.RpcError):  # a bad image: the error path must not dump it either
        gateway.Chat(_chat_request(image=image[:200] + PIXEL_MARKER), metadata=_key(), timeout=60)
    payload = image[len(image) // 2:][:48]
    forbidden = {
        "API key": API_KEY,
        "image marker": PIXEL_MARKER.decode(),
        "image bytes (repr)": repr(payload)[2:40],
        "image bytes (hex)": payload.hex()[:40],
        "image bytes (base64)": base64.b64encode(image[:30]).decode()[:32],
    }
    for svc in (stack.gateway, stack.encoder, stack.decoder):
        text = svc.logs()
        assert len(json_logs(text)) > 5, f"{svc.process.module} wrote no JSON logs"
        for what, needle in forbidden.items():
            assert needle not in text, f"{what} found in the {svc.process.module} log"
