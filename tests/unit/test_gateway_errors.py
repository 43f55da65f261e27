"""How the gateway maps its peers' errors and checks sampling values before any encoding."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from gateway.config import MAX_NEW_TOKENS
from gateway.servicer import _peer_error, _sampling_problem
from internvl.v1 import decoder_pb2


def rpc_error(code: grpc.StatusCode, details: str, trailing=()) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(*trailing), details)


def test_overload_keeps_the_peers_retry_hint():
    err = _peer_error("language decoder", rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full",
                                                    [("retry-after-ms", "1000"), ("other", "x")]))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.message == "language decoder: queue full"
    assert err.trailing_metadata == (("retry-after-ms", "1000"),)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.DEADLINE_EXCEEDED])
def test_client_facing_codes_pass_through(code):
    assert _peer_error("vision encoder", rpc_error(code, "why")).code == code


def test_other_peer_failures_are_internal():
    err = _peer_error("vision encoder", rpc_error(grpc.StatusCode.UNIMPLEMENTED, "no such method"))
    assert err.code == grpc.StatusCode.INTERNAL and "UNIMPLEMENTED" in err.message


@pytest.mark.parametrize(("fields", "problem"), [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": float("nan")}, "top_p must be a finite number"),
    ({"top_k": -2}, "top_k must be >= 0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
    ({"max_new_tokens": MAX_NEW_TOKENS + 1}, f"max_new_tokens must be <= {MAX_NEW_TOKENS}"),
])
def test_sampling_problems(fields, problem):
    assert problem in _sampling_problem(decoder_pb2.SamplingParams(**fields), MAX_NEW_TOKENS)


@pytest.mark.parametrize("fields", [{}, {"temperature": 0.0}, {"top_p": 1.0, "top_k": 0},
                                    {"repetition_penalty": 1.3, "max_new_tokens": 5, "do_sample": True},
                                    {"max_new_tokens": MAX_NEW_TOKENS}])
def test_valid_sampling(fields):
    assert _sampling_problem(decoder_pb2.SamplingParams(**fields), MAX_NEW_TOKENS) is None
