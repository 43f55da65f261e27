"""How the gateway core maps its peers' errors, each front maps the core's errors, and the shared
sampling checks (services/common/limits.py) judge values before any encoding."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from gateway.core import ErrorKind, peer_error
from gateway.http_server import HTTP_STATUS, chat_error_response
from gateway.servicer import GRPC_CODES
from internvl.v1 import decoder_pb2
from services.common.limits import proto_sampling_problem


def rpc_error(code: grpc.StatusCode, details: str, trailing=()) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(*trailing), details)


def test_overload_keeps_the_peers_retry_hint():
    err = peer_error("language decoder", rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full",
                                                   [("retry-after-ms", "1000"), ("other", "x")]))
    assert err.kind == ErrorKind.OVERLOADED and GRPC_CODES[err.kind] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.message == "language decoder: queue full"
    assert err.retry_after_ms == 1000
    response = chat_error_response(err)
    assert response.status_code == 429 and response.headers["retry-after"] == "1"


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.DEADLINE_EXCEEDED])
def test_client_facing_codes_pass_through(code):
    assert GRPC_CODES[peer_error("vision encoder", rpc_error(code, "why")).kind] == code


def test_other_peer_failures_are_internal():
    err = peer_error("vision encoder", rpc_error(grpc.StatusCode.UNIMPLEMENTED, "no such method"))
    assert GRPC_CODES[err.kind] == grpc.StatusCode.INTERNAL and "UNIMPLEMENTED" in err.message


def test_every_error_kind_has_a_grpc_code_and_an_http_status():
    assert set(GRPC_CODES) == set(ErrorKind) == set(HTTP_STATUS)
    assert {HTTP_STATUS[k] for k in (ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE_EXCEEDED, ErrorKind.TOO_LARGE)} \
        == {503, 504, 413}


@pytest.mark.parametrize(("fields", "problem"), [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": float("nan")}, "top_p must be a finite number"),
    ({"top_k": -2}, "top_k must be >= 0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
    ({"stop": [""]}, "stop strings must be non-empty"),
])
def test_sampling_problems(fields, problem):
    assert problem in proto_sampling_problem(decoder_pb2.SamplingParams(**fields))


@pytest.mark.parametrize("fields", [{}, {"temperature": 0.0}, {"top_p": 1.0, "top_k": 0},
                                    {"repetition_penalty": 1.3, "max_new_tokens": 5, "do_sample": True}])
def test_valid_sampling(fields):
    assert proto_sampling_problem(decoder_pb2.SamplingParams(**fields)) is None
