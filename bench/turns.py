"""Whole-turn benchmark: every process real (redis-server, encoder, decoder, gateway), one turn at a time.

Per turn kind, the embedding bytes moved on each hop (from the gateway's /metrics), the gateway's CPU
time per turn (the process's threads' CPU time from /proc/<pid>/task/*/schedstat, read before and after the turn), and
TTFT (the client's wait for the first streamed message of `ChatStream`):

- cold: a new session, an image never seen (random pixels): encoded, written to Redis, sent to the decoder;
- cached: a new session (its own system message, so the decoder's prefix cache cannot hold the prompt)
  with the image of the cold turn: read from Redis and sent to the decoder;
- follow-up: the next turn of the cold turn's session, text only: the decoder holds the history's KV,
  so nothing is read and nothing sent (the lazy-images conversation, decoder.proto).

With `--compare-eager` a second gateway started with `--no-lazy-images` runs the same kinds (every
image sent with every turn), for the before/after. Rounds are interleaved (cold, cached, follow-up,
then again), medians reported, as a Markdown table and JSON.

CPU (default): a checkpoint tiny in everything but the LLM hidden size, which is the real 4096, so one
13-tile image is the real 13 x 256 x 4096 embeddings: 54.5 MB in fp32 (`--dtype fp32`, the CPU default)
or 27.3 MB in bf16. GPU (`--gpu`): the InternVL2-8B shape with random weights, bf16, on CUDA; next to each
kind's TTFT the engine-only TTFT of the same prompt (the decoder's engine in this process, no gRPC, no
gateway, the same token ids; for the follow-up with the history's KV cached as in the stack). Checkpoints
are written to `--checkpoint-dir` once and reused.

    .venv/bin/python -m bench.turns [--rounds 5] [--max-tiles 12] [--compare-eager] [--json PATH]
    python -m bench.turns --gpu [--rounds 5]
    .venv/bin/python -m bench.turns --llm-hidden 64 --max-tiles 1 --rounds 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/turns.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.common.server import channel_options  # noqa: E402

KINDS = ("cold", "cached", "follow_up")
# Embedding bytes per hop, as the gateway counts them (gateway/transfer_stats.py).
HOPS = {
    "encoder_to_gateway": ("ivl_gateway_embedding_received_bytes_total", {"hop": "encoder"}),
    "redis_to_gateway": ("ivl_gateway_embedding_received_bytes_total", {"hop": "feature_cache"}),
    "gateway_to_redis": ("ivl_gateway_embedding_sent_bytes_total", {"hop": "feature_cache"}),
    "gateway_to_decoder": ("ivl_gateway_embedding_sent_bytes_total", {"hop": "decoder"}),
    "skipped_decoder_held": ("ivl_gateway_embedding_skipped_bytes_total", {"hop": "decoder"}),
}
QUESTION = "<image>\nDescribe the image in detail."
WARMUP_SEED = 10**9  # warm-up images: apart from every round's (seed * 1000 + ...)
FOLLOW_UP = "What colours stand out?"


# ---------------------------------------------------------------------------------------------- pure parts


def checkpoint_sizes(gpu: bool, llm_hidden: int = 4096, llm_layers: int | None = None) -> dict:
    """`write_tiny_checkpoint` settings: the InternVL2-8B shape on GPU; on CPU tiny but for the LLM width."""
    if gpu:
        sizes = dict(vision_hidden=1024, vision_layers=24, vision_heads=16, vision_mlp=4096, llm_hidden=4096,
                     llm_layers=32, llm_heads=32, llm_kv_heads=8, llm_ffn=14336)
    else:
        heads = max(1, llm_hidden // 128)
        sizes = dict(vision_hidden=64, vision_layers=1, vision_heads=4, vision_mlp=256, llm_hidden=llm_hidden,
                     llm_layers=1, llm_heads=heads, llm_kv_heads=max(1, heads // 4), llm_ffn=256)
    if llm_layers is not None:
        sizes["llm_layers"] = llm_layers
    return sizes


def cpu_seconds(stat_line: str, ticks_per_s: float) -> float:
    """utime + stime of a /proc/<pid>/stat line, in seconds (the command name may hold spaces)."""
    fields = stat_line[stat_line.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_s  # fields 14 and 15 of proc(5)


def schedstat_seconds(texts: Sequence[str]) -> float:
    """CPU time of threads from their /proc/<pid>/task/<tid>/schedstat texts (first field: ns on a CPU)."""
    return sum(int(text.split()[0]) for text in texts if text.strip()) / 1e9


def process_cpu_seconds(pid: int) -> float:
    """The process's CPU time: per-thread schedstat (nanoseconds) where the kernel has it, else the
    10 ms-tick utime + stime of /proc/<pid>/stat (too coarse for one turn, fine over many)."""
    texts = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            texts.append((task / "schedstat").read_text())
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
    if texts:
        return schedstat_seconds(texts)
    return cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def embedding_nbytes(tiles: int, tokens_per_tile: int, hidden: int, itemsize: int) -> int:
    return tiles * tokens_per_tile * hidden * itemsize


def random_png(seed: int, size: tuple[int, int] = (800, 600)) -> bytes:
    """An image never seen before (noise): 800 x 600 tiles as 4 x 3 + thumbnail = 13 at max 12 tiles."""
    from PIL import Image

    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@dataclass
class TurnSample:
    kind: str
    gateway: str  # "lazy" or "eager"
    ttft_ms: float
    total_ms: float
    gateway_cpu_ms: float
    bytes: dict[str, float]
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass
class KindSummary:
    kind: str
    gateway: str
    rounds: int
    ttft_ms: float
    total_ms: float
    gateway_cpu_ms: float
    bytes: dict[str, float]
    prompt_tokens: int
    cached_prompt_tokens: int
    engine_ttft_ms: float | None = None


def summarize(samples: Sequence[TurnSample]) -> list[KindSummary]:
    """Medians per (gateway, kind), in KINDS order."""
    out = []
    for gateway in dict.fromkeys(s.gateway for s in samples):
        for kind in KINDS:
            group = [s for s in samples if s.kind == kind and s.gateway == gateway]
            if not group:
                continue
            out.append(KindSummary(
                kind, gateway, len(group),
                statistics.median(s.ttft_ms for s in group), statistics.median(s.total_ms for s in group),
                statistics.median(s.gateway_cpu_ms for s in group),
                {hop: statistics.median(s.bytes[hop] for s in group) for hop in HOPS},
                int(statistics.median(s.prompt_tokens for s in group)),
                int(statistics.median(s.cached_prompt_tokens for s in group)),
            ))
    return out


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}" if n else "0"


def table(summaries: Sequence[KindSummary]) -> str:
    engine = any(s.engine_ttft_ms is not None for s in summaries)
    head = ["gateway", "turn", "TTFT ms"] + (["engine-only TTFT ms"] if engine else []) + [
        "gateway CPU ms", "enc->gw MB", "redis->gw MB", "gw->redis MB", "gw->dec MB", "held (skipped) MB",
        "prompt tok", "cached tok"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s.gateway, s.kind.replace("_", "-"), f"{s.ttft_ms:.1f}"]
        if engine:
            cells.append("" if s.engine_ttft_ms is None else f"{s.engine_ttft_ms:.1f}")
        cells += [f"{s.gateway_cpu_ms:.1f}"] + [_mb(s.bytes[h]) for h in HOPS] + [
            str(s.prompt_tokens), str(s.cached_prompt_tokens)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- the stack


def ensure_checkpoint(root: Path, sizes: dict) -> Path:
    """The checkpoint for `sizes` under `root`, written on first use."""
    from services.tools.make_tiny_checkpoint import write_tiny_checkpoint

    name = "turns-" + "-".join(f"{k}{v}" for k, v in sorted(sizes.items()))
    out = root / name
    marker = out / "bench-sizes.json"
    if marker.exists() and json.loads(marker.read_text()) == sizes:
        return out
    write_tiny_checkpoint(out, **sizes, log=lambda msg: print(f"checkpoint: {msg}", file=sys.stderr))
    marker.write_text(json.dumps(sizes))
    return out


@dataclass
class Stack:
    gateways: dict[str, object]  # name -> Observed
    decoder: object
    model_dir: Path
    dtype: str
    device: str
    stubs: dict[str, gateway_pb2_grpc.GatewayStub] = field(default_factory=dict)


@contextmanager
def run_stack(model_dir: Path, device: str, dtype: str, workdir: Path, eager: bool,
              decoder_args: Sequence[str] = ()) -> Iterator[Stack]:
    from tests.integration.observe import start_observed
    from tests.integration.procs import ServiceProcess
    from tests.redis_server import RedisServer

    def slow_start(module: str, process_args: list[str]) -> ServiceProcess:
        return ServiceProcess(module, process_args, start_timeout_s=900.0)  # 16 GB of weights on --gpu

    model = ["--model", str(model_dir), "--device", device, "--dtype", dtype]
    with ExitStack() as stack:
        redis = RedisServer(workdir / "redis").start()
        stack.callback(redis.stop)
        encoder = start_observed("services.vision_encoder", model, log_level="WARNING", process=slow_start)
        stack.callback(encoder.process.stop)
        decoder = start_observed("services.language_decoder", [*model, *decoder_args], log_level="WARNING",
                                 process=slow_start)
        stack.callback(decoder.process.stop)
        gateways = {}
        for name, extra in (("lazy", []), ("eager", ["--no-lazy-images"]))[: 2 if eager else 1]:
            gw = start_observed("gateway", ["--encoder", encoder.process.address, "--decoder",
                                            decoder.process.address, "--redis-url", redis.url, "--insecure-open",
                                            *extra], log_level="WARNING")
            stack.callback(gw.process.stop)
            gateways[name] = gw
        result = Stack(gateways, decoder, model_dir, dtype, device)
        for name, gw in gateways.items():
            channel = grpc.insecure_channel(gw.process.address, options=channel_options())
            stack.callback(channel.close)
            result.stubs[name] = gateway_pb2_grpc.GatewayStub(channel)
        yield result


def timed_turn(stack: Stack, gateway: str, kind: str, session_id: str, text: str, images: Sequence[bytes],
               max_tiles: int, max_new_tokens: int) -> TurnSample:
    observed = stack.gateways[gateway]
    stub = stack.stubs[gateway]
    request = gateway_pb2.ChatRequest(session_id=session_id, text=text,
                                      generation=decoder_pb2.SamplingParams(max_new_tokens=max_new_tokens))
    request.tiling.max_tiles = max_tiles
    for data in images:
        request.images.add(data=data)
    metrics = observed.metrics()
    before = {hop: metrics.get(name, **labels) for hop, (name, labels) in HOPS.items()}
    pid = observed.process.proc.pid
    cpu0 = process_cpu_seconds(pid)
    start = time.perf_counter()
    ttft = None
    usage = None
    for response in stub.ChatStream(request, timeout=600):
        if ttft is None:
            ttft = time.perf_counter() - start
        if response.finish_reason:
            usage = response.usage
    total = time.perf_counter() - start
    cpu = process_cpu_seconds(pid) - cpu0
    metrics = observed.metrics()
    moved = {hop: metrics.get(name, **labels) - before[hop] for hop, (name, labels) in HOPS.items()}
    return TurnSample(kind, gateway, (ttft or total) * 1e3, total * 1e3, cpu * 1e3, moved,
                      usage.prompt_tokens if usage else 0, usage.cached_prompt_tokens if usage else 0)


def run_rounds(stack: Stack, rounds: int, max_tiles: int, max_new_tokens: int, seed: int) -> list[TurnSample]:
    samples = []
    for r in range(rounds):
        for gateway, stub in stack.stubs.items():
            image = random_png(seed * 1000 + r * 10 + len(gateway))  # never seen before this turn
            tag = f"{gateway}-{seed}-{r}"
            first = stub.CreateSession(gateway_pb2.CreateSessionRequest(system_message=f"Session {tag}-a."),
                                       timeout=60).session_id
            samples.append(timed_turn(stack, gateway, "cold", first, QUESTION, [image], max_tiles, max_new_tokens))
            other = stub.CreateSession(gateway_pb2.CreateSessionRequest(system_message=f"Session {tag}-b."),
                                       timeout=60).session_id
            samples.append(timed_turn(stack, gateway, "cached", other, QUESTION, [image], max_tiles, max_new_tokens))
            samples.append(timed_turn(stack, gateway, "follow_up", first, FOLLOW_UP, [], max_tiles, max_new_tokens))
    return samples


# ---------------------------------------------------------------------------------------------- engine only


def engine_only_ttft(model_dir: Path, device: str, dtype: str, num_tiles: int, repeats: int) -> dict[str, float]:
    """TTFT of the decoder's engine alone (this process, no gRPC) for the bench's prompts: the first turn
    with a cold cache, and the follow-up with the first turn's KV cached. Median ms per kind."""
    import torch

    from services.common.checkpoint import parse_dtype
    from services.common.model_config import InternVLConfig
    from services.language_decoder.engine import (
        EngineConfig,
        EngineRequest,
        LLMEngine,
        SamplingParams,
        find_image_spans,
    )
    from services.language_decoder.model import load_language_model
    from services.language_decoder.prompt import expand_image_placeholders, get_template, render_conversation
    from services.language_decoder.tokenizer_loader import load_tokenizer

    torch_dtype = parse_dtype(dtype, device)
    model = load_language_model(model_dir, device=device, dtype=torch_dtype)
    tokenizer = load_tokenizer(model_dir)
    cfg = InternVLConfig.from_dir(model_dir)
    template = get_template(cfg.template)
    engine = LLMEngine(model, EngineConfig(device=device), tokenizer=tokenizer)
    engine.warm_up()
    rows = num_tiles * cfg.num_image_token

    def prompt(system: str, history: list[tuple[str, str]], question: str) -> list[int]:
        text = render_conversation(system, history, question, template)
        return tokenizer.encode(expand_image_placeholders(text, [num_tiles], cfg.num_image_token))

    def first_token_ms(rid: str, ids: list[int], embeds, key: str) -> tuple[float, str]:
        request = EngineRequest(rid, ids, SamplingParams(max_new_tokens=8), embeds,
                                find_image_spans(ids, tokenizer.img_context_id), [key])
        start = time.perf_counter()
        engine.add_request(request)
        first, text = None, []
        while engine.has_unfinished():
            for out in engine.step():
                if first is None:
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    first = time.perf_counter() - start
                text.append(out.text)
        return first * 1e3, "".join(text).strip()

    cold, follow = [], []
    for r in range(repeats):
        embeds = torch.randn(rows, cfg.llm.hidden_size, dtype=torch_dtype, device=device)
        system, key = f"Engine {r}.", f"engine-image-{r}"
        ms, answer = first_token_ms(f"cold-{r}", prompt(system, [], QUESTION), embeds, key)
        cold.append(ms)
        ids = prompt(system, [(QUESTION, answer)], FOLLOW_UP)
        follow.append(first_token_ms(f"follow-{r}", ids, embeds, key)[0])
    return {"cold": statistics.median(cold), "cached": statistics.median(cold), "follow_up": statistics.median(follow)}


# ---------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    device = "cuda" if args.gpu else "cpu"
    dtype = args.dtype or ("bf16" if args.gpu else "fp32")
    sizes = checkpoint_sizes(args.gpu, args.llm_hidden, args.llm_layers)
    root = Path(args.checkpoint_dir)
    model_dir = ensure_checkpoint(root, sizes)
    with tempfile.TemporaryDirectory(prefix="bench-turns-") as tmp, \
            run_stack(model_dir, device, dtype, Path(tmp), args.compare_eager) as stack:
        timed_turn_warmup(stack, args)
        samples = run_rounds(stack, args.rounds, args.max_tiles, args.max_new_tokens, args.seed)
    summaries = summarize(samples)
    if args.engine_only or args.gpu:
        tiles = next((s for s in samples if s.kind == "cold"), None)
        num_tiles = _tiles_of(tiles, sizes["llm_hidden"], 2 if dtype == "bf16" else 4) if tiles else 1
        engine = engine_only_ttft(model_dir, device, dtype, num_tiles, args.rounds)
        for s in summaries:
            s.engine_ttft_ms = engine[s.kind]
    return {"machine": {"python": sys.version.split()[0], "cpus": os.cpu_count(), "device": device,
                        "dtype": dtype},
            "checkpoint": sizes, "rounds": args.rounds, "max_tiles": args.max_tiles,
            "summaries": [asdict(s) for s in summaries], "samples": [asdict(s) for s in samples],
            "table": table(summaries)}


def _tiles_of(sample: TurnSample, hidden: int, itemsize: int, tokens_per_tile: int = 256) -> int:
    """Tiles of the cold turn's image, from the bytes the encoder sent."""
    return max(1, round(sample.bytes["encoder_to_gateway"] / (tokens_per_tile * hidden * itemsize)))


def timed_turn_warmup(stack: Stack, args: argparse.Namespace) -> None:
    """One untimed cold + follow-up per gateway: first-call costs (channels, model info) out of the figures."""
    for gateway, stub in stack.stubs.items():
        session = stub.CreateSession(gateway_pb2.CreateSessionRequest(system_message="Warm-up."),
                                     timeout=60).session_id
        image = random_png(WARMUP_SEED + len(gateway))
        timed_turn(stack, gateway, "cold", session, QUESTION, [image], args.max_tiles, 2)
        timed_turn(stack, gateway, "follow_up", session, FOLLOW_UP, [], args.max_tiles, 2)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="InternVL2-8B shape with random weights, bf16, on CUDA")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tiles", type=int, default=12, help="12: the 800x600 image gives 13 tiles")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--llm-hidden", type=int, default=4096, help="CPU checkpoint's LLM width (4096 = real bytes)")
    p.add_argument("--llm-layers", type=int, default=None, help="override the checkpoint's LLM depth")
    p.add_argument("--compare-eager", action="store_true", help="also a --no-lazy-images gateway, side by side")
    p.add_argument("--engine-only", action="store_true", help="engine-only TTFT also on CPU (always with --gpu)")
    p.add_argument("--checkpoint-dir", default=".cache/bench-turns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.max_tiles < 1:
        p.error("--rounds and --max-tiles must be >= 1")
    return args


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    result = run(args)
    out(result["table"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
