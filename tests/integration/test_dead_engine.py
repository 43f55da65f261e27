"""A dead engine shows in health: real encoder and decoder processes with the test-only fault switch.

Each service runs with `--test-fault-file F` (services/common/engine_health.py): while F exists every
model call fails. After `--engine-max-failures` (K) failed steps/batches in a row the service says
NOT_SERVING (its `liveness` health name stays SERVING); once F is gone its own probe call succeeds
and it says SERVING again, logged and counted; a fault that lasts past `--engine-recovery-timeout`
ends the process with engine_health.EXIT_CODE.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from internvl.v1 import decoder_pb2, decoder_pb2_grpc, vision_pb2, vision_pb2_grpc
from services.common.engine_health import EXIT_CODE
from services.common.server import LIVENESS_SERVICE
from tests.conftest import load_kit
from tests.integration.hardening import DECODER, ENCODER, png, read_metric
from tests.integration.procs import ServiceProcess, free_port
from tests.integration.stack import model_args

KIT = load_kit()
K = 2  # --engine-max-failures
RECOVERY_TIMEOUT_S = 15.0  # --engine-recovery-timeout: generous for a loaded 2-core machine
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def start(module: str, fault: Path) -> tuple[ServiceProcess, int]:
    metrics_port = free_port()
    process = ServiceProcess(module, [*model_args(KIT.root), "--test-fault-file", str(fault),
                                      "--engine-max-failures", str(K),
                                      "--engine-recovery-timeout", str(RECOVERY_TIMEOUT_S),
                                      "--metrics-port", str(metrics_port)])
    return process.start(), metrics_port


def health(channel: grpc.Channel, name: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status


def wait_health(channel: grpc.Channel, want: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    status = health(channel)
    while status != want and time.monotonic() < deadline:
        time.sleep(0.05)
        status = health(channel)
    assert status == want, f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(status)} after {timeout_s}s"


def fail_k_calls(channel: grpc.Channel, call: Callable[[], object], detail: str) -> None:
    """K calls, each one failed model call: SERVING until the K-th, NOT_SERVING soon after it."""
    for _ in range(K):
        assert health(channel) == SERVING, "NOT_SERVING before K failures in a row"
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
        assert detail in err.value.details()
    wait_health(channel, NOT_SERVING, timeout_s=10)
    assert health(channel, LIVENESS_SERVICE) == SERVING, "liveness must not restart a pod that may recover"


def test_decoder_not_serving_after_k_failed_steps_then_recovers_then_exits(tmp_path: Path):
    fault = tmp_path / "fault"
    decoder, metrics_port = start(DECODER, fault)
    request = decoder_pb2.GenerateRequest(setup=decoder_pb2.GenerateSetup(
        conversation=decoder_pb2.Conversation(question="Hello"), sampling=decoder_pb2.SamplingParams(max_new_tokens=2)))
    try:
        with decoder.channel() as channel:
            stub = decoder_pb2_grpc.LanguageDecoderStub(channel)

            def generate() -> list:
                return list(stub.Generate(iter([request]), timeout=60))

            assert generate()[-1].finish_reason != decoder_pb2.FINISH_REASON_UNSPECIFIED
            fault.touch()
            fail_k_calls(channel, generate, "injected fault")
            assert read_metric(metrics_port, "ivl_engine_healthy") == 0
            assert read_metric(metrics_port, "ivl_engine_unhealthy_total") == 1

            fault.unlink()  # the next probe step succeeds
            wait_health(channel, SERVING, timeout_s=RECOVERY_TIMEOUT_S)
            assert read_metric(metrics_port, "ivl_engine_recoveries_total") == 1
            assert read_metric(metrics_port, "ivl_engine_healthy") == 1
            assert "engine recovered" in decoder.output_tail()
            assert generate()[-1].finish_reason != decoder_pb2.FINISH_REASON_UNSPECIFIED

            fault.touch()  # and now for good: the process exits for the orchestrator to replace it
            fail_k_calls(channel, generate, "injected fault")
        assert decoder.proc is not None
        code = decoder.proc.wait(timeout=RECOVERY_TIMEOUT_S + 30)
        assert code == EXIT_CODE, decoder.output_tail()
        assert "kept failing" in decoder.output_tail()
    finally:
        decoder.stop()


def test_encoder_not_serving_after_k_failed_batches_then_recovers(tmp_path: Path):
    fault = tmp_path / "fault"
    encoder, metrics_port = start(ENCODER, fault)
    request = vision_pb2.EncodeRequest(images=vision_pb2.ImageList(images=[vision_pb2.ImageInput(data=png(64, 48))]))
    try:
        with encoder.channel() as channel:
            stub = vision_pb2_grpc.VisionEncoderStub(channel)

            def encode() -> list:
                return list(stub.Encode(request, timeout=60))

            assert encode()
            fault.touch()
            fail_k_calls(channel, encode, "the encoder failed on this request")
            fault.unlink()
            wait_health(channel, SERVING, timeout_s=RECOVERY_TIMEOUT_S)
            assert read_metric(metrics_port, "ivl_engine_recoveries_total") == 1
            assert read_metric(metrics_port, "ivl_engine_failures_total") >= K
            assert "engine recovered" in encoder.output_tail()
            assert encode()
    finally:
        assert encoder.stop() == 0, encoder.final_output
