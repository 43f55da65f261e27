"""The pure parts of bench/turns.py (the whole-turn benchmark): sizes, CPU-time parsing, summaries.

The benchmark itself starts every process; a smoke run of it is `python -m bench.turns --llm-hidden 64
--max-tiles 1 --rounds 1`. Here: that its checkpoint gives the real per-image bytes, that it reads CPU
time right, and that its table and medians say what the samples say.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import pytest
from PIL import Image

from bench import turns
from services.vision_encoder.preprocess import dynamic_preprocess


def test_cpu_checkpoint_has_the_real_llm_width_so_an_image_is_its_real_size() -> None:
    sizes = turns.checkpoint_sizes(gpu=False)
    assert sizes["llm_hidden"] == 4096 and sizes["llm_layers"] == 1
    assert sizes["llm_hidden"] % sizes["llm_heads"] == 0 and sizes["llm_heads"] % sizes["llm_kv_heads"] == 0
    # 13 tiles x 256 rows x 4096: 27.3 MB in bf16, 54.5 MB in fp32.
    assert turns.embedding_nbytes(13, 256, sizes["llm_hidden"], 2) == 27_262_976
    assert turns.embedding_nbytes(13, 256, sizes["llm_hidden"], 4) == 54_525_952
    gpu = turns.checkpoint_sizes(gpu=True)
    assert (gpu["llm_hidden"], gpu["llm_layers"], gpu["llm_heads"], gpu["llm_kv_heads"], gpu["llm_ffn"]) == \
        (4096, 32, 32, 8, 14336)
    assert turns.checkpoint_sizes(gpu=False, llm_hidden=64, llm_layers=3)["llm_layers"] == 3


def test_the_benchmark_image_tiles_as_a_13_tile_image() -> None:
    png = turns.random_png(3)
    assert png == turns.random_png(3) != turns.random_png(4)
    image = Image.open(io.BytesIO(png))
    assert image.size == (800, 600)
    assert len(dynamic_preprocess(image.convert("RGB"), max_num=12)) == 13  # 4 x 3 + the thumbnail


def test_cpu_time_parsing() -> None:
    # A command name with spaces and parentheses; utime=250, stime=50 ticks at 100 ticks/s.
    fields = ["S"] + ["0"] * 10 + ["250", "50"] + ["0"] * 30
    line = "1234 (python -m (x) gw) " + " ".join(fields)
    assert turns.cpu_seconds(line, 100) == pytest.approx(3.0)
    assert turns.schedstat_seconds(["1500000000 10 3\n", "500000000 1 1\n", ""]) == pytest.approx(2.0)


def test_process_cpu_seconds_grows_with_work() -> None:
    import os

    before = turns.process_cpu_seconds(os.getpid())
    sum(i * i for i in range(300_000))
    assert turns.process_cpu_seconds(os.getpid()) > before


def sample(kind: str, gateway: str, ttft: float, sent: float) -> turns.TurnSample:
    moved = {hop: 0.0 for hop in turns.HOPS}
    moved["gateway_to_decoder"] = sent
    return turns.TurnSample(kind, gateway, ttft, ttft * 2, ttft / 10, moved, 100, 50)


def test_summaries_are_medians_per_gateway_and_kind_in_order() -> None:
    samples = [sample("follow_up", "lazy", 5, 0), sample("cold", "lazy", 30, 4e6), sample("cold", "lazy", 10, 4e6),
               sample("cold", "lazy", 20, 4e6), sample("cold", "eager", 40, 4e6)]
    summaries = turns.summarize(samples)
    assert [(s.gateway, s.kind, s.rounds) for s in summaries] == \
        [("lazy", "cold", 3), ("lazy", "follow_up", 1), ("eager", "cold", 1)]
    assert summaries[0].ttft_ms == 20 and summaries[0].bytes["gateway_to_decoder"] == 4e6
    text = turns.table(summaries)
    assert "engine-only" not in text
    lines = text.splitlines()
    assert len(lines) == 2 + 3 and "| lazy | follow-up | 5.0 |" in lines[3]
    summaries[0].engine_ttft_ms = 12.5
    assert "engine-only TTFT ms" in turns.table(summaries) and "| 12.5 |" in turns.table(summaries)
    json.dumps([asdict(s) for s in summaries])  # the JSON report holds them as they are


def test_arguments_are_checked() -> None:
    with pytest.raises(SystemExit):
        turns.parse_args(["--rounds", "0"])
    args = turns.parse_args(["--gpu", "--rounds", "2"])
    assert args.gpu and args.rounds == 2 and args.dtype is None
