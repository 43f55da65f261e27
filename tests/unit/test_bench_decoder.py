"""Smoke test of bench/decoder.py: both modes keep running as the engine changes (no speed checks).

The GPU mode will first run on a rented H100 as one short script; `--smoke` runs that same code path
on CPU with a tiny model here, so a broken script is caught before any device time is spent.
"""

from __future__ import annotations

import json

from bench import decoder


def test_cpu_mode_reports_every_workload_and_stream_count(tmp_path, capsys) -> None:
    out = tmp_path / "cpu.json"
    rc = decoder.main(["--streams", "1", "3", "--new-tokens", "3", "--repeat", "1", "--baseline-requests", "1",
                       "--json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and res["mode"] == "cpu" and 50e6 < res["params"] < 100e6
    for kind in ("chat", "unique"):
        rows = res["workloads"][kind]["streams"]
        assert [r["streams"] for r in rows] == [1, 3] and all(r["tokens"] == r["streams"] * 3 for r in rows)
    assert "| one at a time |" in capsys.readouterr().out


def test_gpu_mode_code_path_runs_on_cpu_with_smoke(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    rc = decoder.main(["--gpu", "--smoke", "--single-tokens", "8", "--agg-tokens", "4", "--json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and res["mode"] == "gpu"
    assert res["agg64"]["tokens"] == 64 * 4 and res["single_stream_tok_s"] > 0 and res["ttft_3400_image_s"] > 0


def test_compare_weights_puts_int8_beside_unquantised_weights(tmp_path, capsys) -> None:
    out = tmp_path / "weights.json"
    rc = decoder.main(["--compare-weights", "--smoke", "--new-tokens", "3", "--prompt-len", "16", "--repeat", "1",
                       "--weights-streams", "2", "--json", str(out)])
    res = json.loads(out.read_text())
    rows = {r["weights"]: r for r in res["rows"]}
    assert rc == 0 and res["mode"] == "weights" and res["streams"] == 2
    assert list(rows)[:2] == ["fp32", "int8 (fp32 activations)"]
    assert rows["fp32"]["single_ratio"] == 1.0 and all(r["single_tok_s"] > 0 and r["streams_tok_s"] > 0
                                                        for r in rows.values())
    # int8 block weights: well under half of fp32's bytes even with this tiny model's fp32 embedding and head.
    assert rows["int8 (fp32 activations)"]["bytes_ratio"] < 0.7
    assert "| int8 (fp32 activations) |" in capsys.readouterr().out
