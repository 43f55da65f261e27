"""SIGTERM on the real processes: stop accepting, finish (or, past the grace period, cancel) what is
in flight, exit 0.

The decoder runs with a tiny step budget (observe.SLOW_DECODER_ARGS) so that a long prompt keeps a
call in flight for seconds.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from internvl.v1 import decoder_pb2, decoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from services.common.server import channel_options
from tests.conftest import load_kit
from tests.integration.observe import (
    SLOW_DECODER_ARGS,
    Observed,
    json_logs,
    long_text,
    start_observed,
    wait_for_metrics,
)
from tests.integration.stack import model_args
from tests.redis_server import RedisServer

KIT = load_kit()


@pytest.fixture(scope="module")
def redis(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("shutdown") / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def encoder() -> Iterator[Observed]:
    svc = start_observed("services.vision_encoder", model_args(KIT.root), log_level="INFO")
    yield svc
    svc.process.stop()


def _in_background(fn) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = fn()
            outcome["code"] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            outcome["code"], outcome["details"] = err.code(), err.details()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _wait_refusing_new_calls(address: str, timeout_s: float = 10.0) -> str:
    """Poll fresh connections until one is refused with UNAVAILABLE (the listener is closed); the
    outcome of the last attempt. A call that merely times out is a slow server, not a refusal."""
    deadline = time.monotonic() + timeout_s
    while True:
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                outcome = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                outcome = err.code().name
        if outcome == grpc.StatusCode.UNAVAILABLE.name or time.monotonic() > deadline:
            return outcome
        time.sleep(0.05)


def _wait_for_log(svc: Observed, message_start: str, timeout_s: float = 10.0) -> None:
    """Poll the service's JSON log until a line's message starts with `message_start`."""
    deadline = time.monotonic() + timeout_s
    while not any(e.get("message", "").startswith(message_start) for e in json_logs(svc.logs())):
        assert time.monotonic() < deadline, f"{svc.process.module} never logged {message_start!r}"
        time.sleep(0.05)


def _decoder_request(max_new_tokens: int = 4) -> decoder_pb2.GenerateRequest:
    setup = decoder_pb2.GenerateSetup(conversation=decoder_pb2.Conversation(question=long_text().text),
                                      sampling=decoder_pb2.SamplingParams(max_new_tokens=max_new_tokens))
    return decoder_pb2.GenerateRequest(setup=setup)


def _admitted(decoder: Observed) -> None:
    m = wait_for_metrics(decoder.metrics_port, lambda m: m.get("ivl_decoder_active_sequences") == 1, timeout_s=10)
    assert m.get("ivl_decoder_active_sequences") == 1, "the long request never started"


def test_sigterm_drains_in_flight_chat_then_exits_zero(encoder: Observed, redis: RedisServer) -> None:
    decoder = start_observed("services.language_decoder",
                             [*model_args(KIT.root), *SLOW_DECODER_ARGS, "--grace-seconds", "60"], log_level="INFO")
    gateway = start_observed("gateway", ["--encoder", encoder.process.address, "--decoder", decoder.process.address,
                                         "--redis-url", redis.url, "--insecure-open", "--grace-seconds", "60"],
                             log_level="INFO")
    try:
        channel = grpc.insecure_channel(gateway.process.address, options=channel_options())
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.ChatRequest(text=long_text().text,
                                          generation=decoder_pb2.SamplingParams(max_new_tokens=4))
        thread, outcome = _in_background(lambda: list(stub.ChatStream(request, timeout=120)))
        _admitted(decoder)

        # Both at once, as in a rolling update of everything.
        gateway.process.proc.send_signal(signal.SIGTERM)
        decoder.process.proc.send_signal(signal.SIGTERM)
        assert _wait_refusing_new_calls(gateway.process.address) == "UNAVAILABLE"
        assert _wait_refusing_new_calls(decoder.process.address) == "UNAVAILABLE"

        thread.join(90)
        channel.close()
        assert outcome["code"] == grpc.StatusCode.OK, outcome
        parts = outcome["result"]
        assert parts[-1].finish_reason != decoder_pb2.FINISH_REASON_UNSPECIFIED
        assert parts[-1].usage.prompt_tokens > long_text().tokens
    finally:
        gateway_code = gateway.process.stop()
        decoder_code = decoder.process.stop()
    assert (gateway_code, decoder_code) == (0, 0), gateway.process.final_output + decoder.process.final_output


def test_work_past_the_grace_period_is_cancelled_and_the_exit_is_clean() -> None:
    decoder = start_observed("services.language_decoder",
                             [*model_args(KIT.root), *SLOW_DECODER_ARGS, "--grace-seconds", "1"], log_level="INFO")
    try:
        channel = grpc.insecure_channel(decoder.process.address, options=channel_options())
        stub = decoder_pb2_grpc.LanguageDecoderStub(channel)
        thread, outcome = _in_background(lambda: list(stub.Generate(iter([_decoder_request(4096)]), timeout=120)))
        _admitted(decoder)
        started = time.monotonic()
        decoder.process.proc.send_signal(signal.SIGTERM)
        code = decoder.process.stop()  # waits for the exit
        took = time.monotonic() - started
        thread.join(30)
        channel.close()
    finally:
        decoder.process.stop()
    assert code == 0, decoder.process.final_output
    assert took < 10, f"exit took {took:.1f}s with a 1s grace period"
    assert outcome["code"] in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), outcome
    assert "stopped" in decoder.process.final_output


def test_a_second_sigterm_cancels_at_once() -> None:
    decoder = start_observed("services.language_decoder",
                             [*model_args(KIT.root), *SLOW_DECODER_ARGS, "--grace-seconds", "60"], log_level="INFO")
    try:
        channel = grpc.insecure_channel(decoder.process.address, options=channel_options())
        stub = decoder_pb2_grpc.LanguageDecoderStub(channel)
        thread, outcome = _in_background(lambda: list(stub.Generate(iter([_decoder_request()]), timeout=120)))
        _admitted(decoder)
        started = time.monotonic()
        decoder.process.proc.send_signal(signal.SIGTERM)
        _wait_for_log(decoder, "stopping:")  # the first SIGTERM is handled: the next one hurries the stop
        decoder.process.proc.send_signal(signal.SIGTERM)  # the operator insists
        code = decoder.process.stop()
        took = time.monotonic() - started
        thread.join(30)
        channel.close()
    finally:
        decoder.process.stop()
    assert code == 0, decoder.process.final_output
    assert took < 10, f"exit took {took:.1f}s after a second SIGTERM"
    assert outcome["code"] in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), outcome


def test_idle_encoder_exits_zero(encoder: Observed) -> None:
    assert encoder.process.stop() == 0, encoder.process.final_output
