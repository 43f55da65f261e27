"""Smoke test of bench/transfer.py: every hop runs on a small payload and its bytes arrive intact.

No timing assertions: the point is that the benchmark keeps working (and keeps checking integrity)
as the code it exercises changes. Needs redis-server, like the integration tests.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bench import transfer

SHAPE = (3, 4, 64)  # 3 tiles x 4 tokens x 64 hidden bf16 = 1,536 bytes
CHUNK = 100  # odd-sized chunks, so reassembly spans chunk boundaries inside and across tiles


@pytest.fixture(scope="module")
def payload() -> bytes:
    return transfer.make_payload(transfer.payload_nbytes(SHAPE))


def _check(result: transfer.Result, nbytes: int, repeats: int = 1) -> None:
    assert result.verified, result.key
    assert result.nbytes == nbytes
    assert len(result.samples_ms) == repeats
    assert all(s >= 0 for s in result.samples_ms)


def test_payload_is_deterministic_and_sized():
    assert transfer.payload_nbytes(transfer.SHAPE_8B_13_TILES) == 27_262_976
    assert transfer.make_payload(64) == transfer.make_payload(64) != transfer.make_payload(64, seed=7)


def test_raw_socket(payload):
    (result,) = asyncio.run(transfer.bench_raw_socket(payload, repeats=1, warmup=0))
    _check(result, len(payload))


def test_grpc_hops(payload):
    results = asyncio.run(transfer.bench_grpc_hops(payload, SHAPE, repeats=1, warmup=0, chunk_bytes=CHUNK))
    assert [r.key for r in results] == ["encoder_to_gateway", "gateway_to_decoder", "encoder_gateway_decoder"]
    for r in results:
        _check(r, len(payload))


def test_grpc_hops_reject_a_payload_the_encoder_peer_cannot_reproduce(payload):
    with pytest.raises(ValueError, match="make_payload"):
        asyncio.run(transfer.bench_grpc_hops(bytes(len(payload)), SHAPE, repeats=1, warmup=0))


def test_redis(payload, tmp_path):
    results = asyncio.run(transfer.bench_redis(payload, SHAPE, repeats=1, warmup=0, workdir=tmp_path))
    assert {r.key for r in results} == {"cache_put", "cache_get", "redis_set", "redis_get", "encode_entry",
                                        "decode_entry"}
    for r in results:
        _check(r, len(payload))


def test_run_reports_ratios_and_json(capsys):
    report = transfer.run(shape=SHAPE, repeats=1, warmup=0, chunk_bytes=CHUNK)
    assert report.baseline.ratio == pytest.approx(1.0)
    assert len(report.baseline.samples_ms) == 1
    assert all(r.verified and r.ratio and r.ratio > 0 for r in report.results)
    assert "encoder -> gateway -> decoder" in report.table()
    data = json.loads(json.dumps(report.as_dict()))
    assert data["payload"]["nbytes"] == transfer.payload_nbytes(SHAPE)
    assert len(data["results"]) == 1 + len(report.results)
