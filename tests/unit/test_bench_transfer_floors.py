"""Smoke test of bench/transfer.py's floors and alternatives (gRPC with no protobuf, protobuf alone, RESP by
hand, the asyncio Redis client), and of the targets it reports. Small payloads, no timing assertions."""

from __future__ import annotations

import asyncio

import pytest

from bench import transfer

SHAPE = (3, 4, 64)  # 1,536 bytes
CHUNK = 100


@pytest.fixture(scope="module")
def payload() -> bytes:
    return transfer.make_payload(transfer.payload_nbytes(SHAPE))


def _check(results: list[transfer.Result], keys: list[str], nbytes: int) -> None:
    assert [r.key for r in results] == keys
    for r in results:
        assert r.verified and r.nbytes == nbytes and len(r.samples_ms) == 1 and r.copies, r.key


def test_grpc_floor(payload):
    results = asyncio.run(transfer.bench_grpc_floor(payload, SHAPE, repeats=1, warmup=0, chunk_bytes=CHUNK))
    _check(results, ["grpc_receive", "grpc_send", "protobuf_parse", "protobuf_serialize"], len(payload))


def test_resp_floor(payload, tmp_path):
    results = asyncio.run(transfer.bench_resp_floor(payload, repeats=1, warmup=0, workdir=tmp_path))
    _check(results, ["resp_set", "resp_get"], len(payload))


def test_redis_async(payload, tmp_path):
    results = asyncio.run(transfer.bench_redis_async(payload, SHAPE, repeats=1, warmup=0, workdir=tmp_path,
                                                     chunk_bytes=CHUNK))
    _check(results, ["cache_put_async", "cache_get_async", "redis_set_async", "redis_get_async"], len(payload))


def test_report_states_floors_copies_and_targets():
    report = transfer.run(shape=SHAPE, repeats=1, warmup=0, chunk_bytes=CHUNK)
    keys = {r.key for r in report.results}
    assert {"grpc_receive", "grpc_send", "resp_get", "cache_get_async"} <= keys
    hop = report.by_key("encoder_to_gateway")
    assert hop.floor == "grpc_receive" and hop.floor_ratio is not None and hop.copies
    table = report.table()
    assert "CPU x floor" in table and "Targets (issue 10):" in table and "CPU per MB" in table
    whats = [t[0] for t in report.targets()]
    assert len(whats) == 4 and any("both hops" in w for w in whats)
    assert all(t["met"] in (True, False) for t in report.as_dict()["targets"])
