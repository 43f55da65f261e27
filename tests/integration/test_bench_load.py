"""Smoke test of bench/load.py: a few clients for a few seconds against the real stack.

No throughput assertions: the point is that the benchmark keeps working (and keeps judging its
run: only OK or RESOURCE_EXHAUSTED) as the code it drives changes.
"""

from __future__ import annotations

import json

from bench import load


def test_load_benchmark_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "load.json"
    rc = load.main(["--clients", "6", "--duration", "3", "--image-fraction", "0.5", "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0, result["codes"]
    assert result["codes"].get("OK", 0) > 0 and set(result["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert result["latency_s"]["p50"] is not None and result["tokens_per_s"] > 0
    assert set(result["rss_mib"]) == {"gateway", "encoder", "decoder", "redis"}
    assert "| throughput |" in capsys.readouterr().out
