"""Decoder engine benchmark: aggregate decode throughput under concurrency (CPU), and the GPU figures.

CPU (default): a random InternLM2 of about 63M parameters (hidden 512, 8 layers, 8 heads / 2 KV heads,
FFN 2048, vocab 32,000), built in process. Every stream sends a random prompt and generates a fixed
number of tokens (no stop token). Reports generated tokens/s with 1, 4, 16 and 64 streams submitted
at once, each as a ratio to one request at a time on the same engine and model, in the same run (the
best lone-request rate seen: the one-at-a-time rounds and the 1-stream rounds alike):

    .venv/bin/python bench/decoder.py [--prompt-len 64] [--shared-prefix 48] [--new-tokens 128]

Two workloads, measured in interleaved rounds (best round kept): "chat", where every prompt opens with
the same 48-token system prefix (as every InternVL2 prompt opens with its system message; the engine's
prefix cache serves it) followed by 16 tokens of its own, and "unique", 64 random tokens per prompt.

GPU (`--gpu`): the real InternVL2-8B LLM shape (internlm2_5-7b: 32 layers, hidden 4096, GQA 32/8,
vocab 92,553) with random bf16 weights. Reports the device copy bandwidth, single-stream decode
tokens/s and its ratio to the memory-bandwidth bound (bytes read per decode step / copy bandwidth),
TTFT of a 3,400-token prompt carrying one image's embeddings (13 tiles x 256 rows), and aggregate
tokens/s at 64 streams. One short script (~2-4 minutes on an H100):

    python bench/decoder.py --gpu

Weights side by side (`--compare-weights`): int8 decoder-block weights (services/language_decoder/quantize.py)
against unquantised ones in one run, on the same random weights: single-stream decode tokens/s and aggregate
tokens/s at N streams, each as a ratio to the first row, and the bytes the weights take. CPU: fp32, int8
(fp32 activations), and where the CPU has bf16 kernels bf16 and int8 with bf16 activations (torch's int8
weight-only kernel), 16 streams. GPU (`--gpu --compare-weights`): the InternVL2-8B shape in bf16 and int8,
64 streams, compiled layers and CUDA graphs as served:

    .venv/bin/python bench/decoder.py --compare-weights
    python bench/decoder.py --gpu --compare-weights

Results print as a Markdown table and as JSON (`--json PATH` writes the JSON to a file).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.known_configs import internvl2_8b_config  # noqa: E402
from services.common.model_config import LLMConfig, RopeScaling  # noqa: E402
from services.language_decoder.engine import EngineConfig, EngineRequest, LLMEngine, SamplingParams  # noqa: E402
from services.language_decoder.model import InternLM2ForCausalLM  # noqa: E402
from services.language_decoder.quantize import quantize_model, weight_bytes  # noqa: E402

CPU_CONFIG = LLMConfig(
    vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, rope_theta=1_000_000.0, rope_scaling=RopeScaling("dynamic", 2.0),
    max_position_embeddings=32768,
)


def random_model(cfg: LLMConfig, device: str, dtype: torch.dtype, seed: int = 0) -> InternLM2ForCausalLM:
    """Random weights without a slow CPU init: built on meta, materialised on the device, N(0, 0.02)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = InternLM2ForCausalLM(cfg).to(dtype)  # cast on meta: the device never holds fp32 weights
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.rotary.init_buffers(device)
    return model.eval().requires_grad_(False)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def run_streams(engine: LLMEngine, batch: list[list[int]], new_tokens: int, tag: str) -> dict:
    """Submit every prompt at once, step to completion; wall time, tokens, time to first tokens."""
    device = engine.runner.device.type
    params = SamplingParams(max_new_tokens=new_tokens)
    sync(device)
    t0 = time.perf_counter()
    for i, p in enumerate(batch):
        engine.add_request(EngineRequest(f"{tag}-{i}", p, params))
    first: dict[str, float] = {}
    generated = 0
    while engine.has_unfinished():
        for out in engine.step():
            generated += len(out.token_ids)
            first.setdefault(out.request_id, time.perf_counter())
    sync(device)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens": generated, "tok_s": generated / wall,
            "first_token_s": max(first.values()) - t0}


def one_at_a_time(engine: LLMEngine, batch: list[list[int]], new_tokens: int, tag: str) -> dict:
    wall = tokens = 0.0
    for i, p in enumerate(batch):
        r = run_streams(engine, [p], new_tokens, f"{tag}-{i}")
        wall += r["wall_s"]
        tokens += r["tokens"]
    return {"wall_s": wall, "tokens": int(tokens), "tok_s": tokens / wall}


def machine() -> dict:
    model_name = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": model_name, "nproc": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --------------------------------------------------------------------------- CPU


WORKLOADS = {
    # Every InternVL2 chat prompt opens with the same system message: a shared prefix that the engine
    # serves from its prefix cache, then the user's own tokens.
    "chat": "a shared {shared}-token system prefix + {unique} tokens of each request's own",
    # Nothing shared: every prompt token is prefilled.
    "unique": "{prompt_len} random tokens per request, nothing shared",
}


def workload_prompts(kind: str, n: int, args: argparse.Namespace, seed: int) -> list[list[int]]:
    vocab = CPU_CONFIG.vocab_size
    if kind == "unique":
        return prompts(n, args.prompt_len, vocab, seed)
    system = prompts(1, args.shared_prefix, vocab, 7)[0]
    return [system + p for p in prompts(n, args.prompt_len - args.shared_prefix, vocab, seed)]


def bench_cpu(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    model = random_model(CPU_CONFIG, "cpu", torch.float32)
    streams = sorted(args.streams)
    max_len = args.prompt_len + args.new_tokens
    cfg = EngineConfig(
        block_size=16, max_num_seqs=max(streams), max_num_batched_tokens=max(2048, max(streams)),
        max_model_len=max_len, num_kv_blocks=max(streams) * -(-max_len // 16) + 64,
    )
    engine = LLMEngine(model, cfg)
    for kind in args.workloads:  # warm-up; the chat workload's system prefix is now cached
        run_streams(engine, workload_prompts(kind, 4, args, 99), 8, f"warmup-{kind}")
    load_before = os.getloadavg()
    # Rounds interleave every figure (so slow spells hit them alike) and each figure keeps its best
    # round: on a shared machine other processes only ever slow a run down.
    best: dict[tuple[str, int], dict] = {}

    def keep(key: tuple[str, int], r: dict) -> None:
        if r["tok_s"] > best.get(key, {"tok_s": 0.0})["tok_s"]:
            best[key] = r

    for k in range(args.repeat):
        for kind in args.workloads:
            # Fresh prompts every round: a repeated prompt would hit the prefix cache.
            base_prompts = workload_prompts(kind, args.baseline_requests, args, 1000 * k + 1)
            r = one_at_a_time(engine, base_prompts, args.new_tokens, f"{kind}-base{k}")
            print(f"  round {k + 1} {kind}: one at a time {r['tok_s']:7.1f} tok/s", flush=True)
            keep((kind, 0), r)
            for n in streams:
                batch = workload_prompts(kind, n, args, 1000 * k + 100 + n)
                r = run_streams(engine, batch, args.new_tokens, f"{kind}-s{n}-{k}")
                print(f"  round {k + 1} {kind}: {n:3d} streams {r['tok_s']:7.1f} tok/s ({r['wall_s']:.1f} s)",
                      flush=True)
                keep((kind, n), r)
    results = {}
    for kind in args.workloads:
        # A 1-stream run is one request alone too: the baseline is the best lone-request rate seen.
        base = max((best[key] for key in ((kind, 0), (kind, 1)) if key in best), key=lambda r: r["tok_s"])
        results[kind] = {
            "prompts": WORKLOADS[kind].format(shared=args.shared_prefix, prompt_len=args.prompt_len,
                                              unique=args.prompt_len - args.shared_prefix),
            "baseline": base,
            "streams": [best[(kind, n)] | {"streams": n, "ratio": best[(kind, n)]["tok_s"] / base["tok_s"]}
                        for n in streams],
        }
    return {"mode": "cpu", "machine": machine() | {"loadavg_before": load_before, "loadavg_after": os.getloadavg()},
            "params": num_params(model),
            "config": {"llm": vars(CPU_CONFIG) | {"rope_scaling": "dynamic 2.0"}, "engine": str(cfg),
                       "prompt_len": args.prompt_len, "shared_prefix": args.shared_prefix,
                       "new_tokens": args.new_tokens, "repeat": args.repeat,
                       "baseline_requests": args.baseline_requests},
            "workloads": results}


def cpu_table(res: dict) -> str:
    kinds = list(res["workloads"])
    head = "| streams | " + " | ".join(f"{k}: tok/s | {k}: x one at a time" for k in kinds) + " |"
    lines = [head, "|---|" + "---|---|" * len(kinds)]
    first = res["workloads"][kinds[0]]
    lines.append("| one at a time | " + " | ".join(
        f"{res['workloads'][k]['baseline']['tok_s']:.1f} | 1.00" for k in kinds) + " |")
    for i, row in enumerate(first["streams"]):
        cells = []
        for k in kinds:
            r = res["workloads"][k]["streams"][i]
            cells.append(f"{r['tok_s']:.1f} | {r['ratio']:.2f}")
        lines.append(f"| {row['streams']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- GPU


def copy_bandwidth(device: str, nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        y.copy_(x)
    sync(device)
    seconds = time.perf_counter() - t0
    del x, y
    return 2 * nbytes * iters / seconds


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def batch1_graph(runner) -> torch.cuda.CUDAGraph:
    """The captured batch-1 decode graph (smallest key bucket), with every input row pointed at the
    scratch block so that replaying it writes no real sequence's KV."""
    graphs = runner.graphs
    graph, _ = graphs.graphs[min(k for k in graphs.graphs if k[0] == 1)]
    graphs._fill_padding(0)
    return graph


def graph_replay_tok_s(runner, iters: int = 100) -> float:
    """Decode steps/s of the batch-1 graph replayed back to back, no host work in between."""
    graph = batch1_graph(runner)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        graph.replay()
    torch.cuda.synchronize()
    return iters / (time.perf_counter() - t0)


def smoke_config() -> LLMConfig:
    """`--smoke`: the GPU mode's code path on CPU with a tiny InternLM2 (checks the script, not speed)."""
    real = internvl2_8b_config().llm
    return LLMConfig(**{**vars(real), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000})


def single_stream(engine: LLMEngine, tag: str, n_new: int, seed: int) -> float:
    """One request alone: decode tokens/s between its first and its last token."""
    vocab = engine.runner.model.config.vocab_size - 16
    engine.add_request(EngineRequest(tag, prompts(1, 128, vocab, seed)[0], SamplingParams(max_new_tokens=n_new)))
    stamps = []
    while engine.has_unfinished():
        for _ in engine.step():
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")


def gpu_engine(model: InternLM2ForCausalLM, args: argparse.Namespace, device: str, compile_: bool,
               num_kv_blocks: int | None = None) -> LLMEngine:
    cfg = EngineConfig(
        device=device, block_size=args.block_size, max_num_seqs=64, max_num_batched_tokens=8192,
        max_model_len=8192, use_cuda_graphs=not args.no_cuda_graphs, compile_layers=compile_,
        compile_mode=args.compile_mode,
        num_kv_blocks=1024 if args.smoke else num_kv_blocks,
    )
    return LLMEngine(model, cfg)


def release(engine: LLMEngine, device: str) -> None:
    """Drop an engine's KV cache and CUDA graphs before the next one allocates its own."""
    engine.runner.graphs = None
    engine.runner.kv_cache = None
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def profile_replays(runner, path: Path | None, steps: int = 5) -> str:
    """Kernel time per kernel name over a few replays of the batch-1 decode graph (top 20)."""
    from torch.profiler import ProfilerActivity, profile

    graph = batch1_graph(runner)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70)
    if path is not None:
        path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=200))
    return table


def bench_gpu(args: argparse.Namespace) -> dict:
    device = "cpu" if args.smoke else "cuda"
    llm = smoke_config() if args.smoke else internvl2_8b_config().llm
    dtype = torch.bfloat16
    bw = copy_bandwidth(device, nbytes=(64 << 20) if args.smoke else (2 << 30))
    model = random_model(llm, device, dtype)
    itemsize = 2
    weight_bytes = num_params(model) * itemsize
    # A decode step reads every weight once except the embedding table (one row per token).
    read_bytes = weight_bytes - model.model.tok_embeddings.weight.numel() * itemsize
    bound = bw / read_bytes
    if device == "cuda":
        torch.cuda.empty_cache()
    compile_ = device == "cuda" and not args.no_compile

    # Side by side: the same single stream with eager layers (CUDA graphs still on), before compiling.
    base = gpu_engine(model, args, device, compile_=False, num_kv_blocks=1024)
    single_stream(base, "warm-base", args.single_tokens, 1)
    base_tok_s = single_stream(base, "base", args.single_tokens, 2)
    base_replay = graph_replay_tok_s(base.runner) if base.runner.graphs is not None else float("nan")
    print(f"  single stream, layers not compiled: {base_tok_s:.1f} tok/s; graph replay alone {base_replay:.1f}",
          flush=True)
    release(base, device)

    t0 = time.perf_counter()
    engine = gpu_engine(model, args, device, compile_=compile_)
    runner = engine.runner
    print(f"  KV cache: {runner.num_blocks} blocks of {args.block_size} ({runner.kv_cache.nbytes / 2**30:.1f} GiB); "
          f"attention: {'flash-attn' if runner.use_flash else 'sdpa'}; cuda graphs: {runner.graphs is not None}; "
          f"compiled layers: {compile_}", flush=True)

    single_stream(engine, "warm-single", args.single_tokens, 1)  # same lengths: every graph is captured here
    print(f"  first stream (compiles and captures): {time.perf_counter() - t0:.1f} s", flush=True)
    single_tok_s = single_stream(engine, "single", args.single_tokens, 2)
    print(f"  single stream: {single_tok_s:.1f} tok/s (bound {bound:.1f})", flush=True)
    # The same stream with every decode step launched eagerly, and the batch-1 graph replayed back to
    # back (the GPU's own time per step: what is left of the gap is host work between steps).
    graphs, runner.graphs = runner.graphs, None
    eager_tok_s = single_stream(engine, "eager-single", min(args.single_tokens, 64), 3)
    runner.graphs = graphs
    replay_tok_s = graph_replay_tok_s(runner) if graphs is not None else float("nan")
    print(f"  eager single stream: {eager_tok_s:.1f} tok/s; batch-1 graph replay alone: {replay_tok_s:.1f} tok/s",
          flush=True)
    if args.profile and graphs is not None:
        print(profile_replays(runner, args.profile), flush=True)

    # TTFT: 3,400 prompt tokens, 3,328 of them one image's embeddings (13 tiles x 256).
    vocab = llm.vocab_size - 16
    ctx_id = llm.vocab_size - 7  # any id: spans say where the image rows go
    n_img = 13 * 256

    def ttft(tag: str, seed: int) -> float:
        # Fresh text and a fresh image hash every time: nothing comes from the prefix cache.
        head, tail = prompts(2, 40, vocab, seed)
        ids = head + [ctx_id] * n_img + tail[: 3400 - 40 - n_img]
        embeds = torch.randn(n_img, llm.hidden_size, device=device, dtype=dtype)
        req = EngineRequest(tag, ids, SamplingParams(max_new_tokens=1), embeds, [(40, 40 + n_img)], [tag])
        sync(device)
        t0 = time.perf_counter()
        engine.add_request(req)
        while engine.has_unfinished():
            if engine.step():
                break
        return time.perf_counter() - t0

    ttft("warm-ttft", 10)
    ttft_s = min(ttft(f"ttft-{i}", 11 + i) for i in range(3))
    print(f"  TTFT 3,400 tokens with one image: {ttft_s * 1e3:.0f} ms", flush=True)

    # 64 streams at once.
    run_streams(engine, prompts(64, 128, vocab, 7), args.agg_tokens, "warm64")
    agg = run_streams(engine, prompts(64, 128, vocab, 8), args.agg_tokens, "agg64")
    print(f"  64 streams: {agg['tok_s']:.0f} tok/s", flush=True)
    return {"mode": "gpu", "machine": machine(), "params": num_params(model), "weight_bytes": weight_bytes,
            "decode_read_bytes": read_bytes, "copy_bandwidth_bytes_s": bw, "bound_tok_s": bound,
            "single_stream_tok_s": single_tok_s, "single_ratio_to_bound": single_tok_s / bound,
            "single_stream_eager_tok_s": eager_tok_s, "batch1_graph_replay_tok_s": replay_tok_s,
            "single_stream_uncompiled_tok_s": base_tok_s, "batch1_graph_replay_uncompiled_tok_s": base_replay,
            "ttft_3400_image_s": ttft_s, "agg64": agg,
            "attention": "flash-attn" if runner.use_flash else "sdpa", "cuda_graphs": runner.graphs is not None,
            "compiled_layers": compile_, "compile_mode": args.compile_mode, "block_size": args.block_size}


def gpu_table(res: dict) -> str:
    return "\n".join([
        "| figure | value |", "|---|---|",
        f"| device copy bandwidth (read + write) | {res['copy_bandwidth_bytes_s'] / 1e9:.0f} GB/s |",
        f"| bytes read per decode step | {res['decode_read_bytes'] / 1e9:.2f} GB |",
        f"| bandwidth bound | {res['bound_tok_s']:.1f} tok/s |",
        f"| single-stream decode | {res['single_stream_tok_s']:.1f} tok/s "
        f"({res['single_ratio_to_bound'] * 100:.0f}% of the bound) |",
        f"| single-stream decode, steps launched eagerly (no CUDA graphs) | "
        f"{res['single_stream_eager_tok_s']:.1f} tok/s |",
        f"| batch-1 graph replayed back to back (GPU time alone) | {res['batch1_graph_replay_tok_s']:.1f} tok/s |",
        f"| single-stream decode, layers not compiled (CUDA graphs on) | "
        f"{res['single_stream_uncompiled_tok_s']:.1f} tok/s (replay alone "
        f"{res['batch1_graph_replay_uncompiled_tok_s']:.1f}) |",
        f"| TTFT, 3,400-token prompt with one image (13 tiles) | {res['ttft_3400_image_s'] * 1e3:.0f} ms |",
        f"| aggregate, 64 streams | {res['agg64']['tok_s']:.0f} tok/s |",
    ])


# --------------------------------------------------------------------------- weights side by side


def weight_variants(gpu: bool) -> list[tuple[str, torch.dtype, str]]:
    """(label, compute dtype, quantisation) per row; the first row is the baseline of the ratios."""
    if gpu:
        return [("bf16", torch.bfloat16, "none"), ("int8 (bf16 activations)", torch.bfloat16, "int8")]
    rows = [("fp32", torch.float32, "none"), ("int8 (fp32 activations)", torch.float32, "int8")]
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        rows += [("bf16", torch.bfloat16, "none"), ("int8 (bf16 activations)", torch.bfloat16, "int8")]
    return rows


def bench_weights(args: argparse.Namespace) -> dict:
    gpu = args.gpu and not args.smoke
    device = "cuda" if gpu else "cpu"
    if not gpu:
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    llm = smoke_config() if args.smoke else internvl2_8b_config().llm if gpu else CPU_CONFIG
    streams = args.weights_streams or (64 if args.gpu else 16)
    single_tokens = args.single_tokens if args.gpu else args.new_tokens
    stream_tokens = args.agg_tokens if args.gpu else args.new_tokens
    vocab = llm.vocab_size - 16
    rows = []
    for label, dtype, quantize in weight_variants(gpu):
        # The same random weights every row (same seed); int8 rows quantise them in place, layer by layer.
        model = random_model(llm, device, dtype)
        params = num_params(model)
        held = weight_bytes(quantize_model(model, quantize, dtype))
        if gpu:
            engine = gpu_engine(model, args, device, compile_=not args.no_compile,
                                num_kv_blocks=streams * -(-(args.prompt_len + stream_tokens) // args.block_size) + 64)
        else:
            max_len = max(128 + single_tokens, args.prompt_len + stream_tokens)
            engine = LLMEngine(model, EngineConfig(
                block_size=16, max_num_seqs=streams, max_num_batched_tokens=max(2048, streams), max_model_len=max_len,
                num_kv_blocks=(streams + 1) * -(-max_len // 16) + 64))
        single_stream(engine, f"{label}-warm", min(single_tokens, 16), 1)  # compiles / captures the graphs
        run_streams(engine, prompts(streams, args.prompt_len, vocab, 5), 4, f"{label}-warm-n")
        single = max(single_stream(engine, f"{label}-single-{k}", single_tokens, 2 + k) for k in range(args.repeat))
        many = max((run_streams(engine, prompts(streams, args.prompt_len, vocab, 100 + k), stream_tokens,
                                f"{label}-n-{k}") for k in range(args.repeat)), key=lambda r: r["tok_s"])
        print(f"  {label}: weights {held / 2**20:.1f} MiB; 1 stream {single:.1f} tok/s; "
              f"{streams} streams {many['tok_s']:.1f} tok/s", flush=True)
        rows.append({"weights": label, "weight_bytes": held, "single_tok_s": single, "streams_tok_s": many["tok_s"]})
        release(engine, device)
        del engine, model  # before the next row's model is built (on a GPU: 15.5 GB of bf16 weights)
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    base = rows[0]
    for r in rows:
        r["single_ratio"] = r["single_tok_s"] / base["single_tok_s"]
        r["streams_ratio"] = r["streams_tok_s"] / base["streams_tok_s"]
        r["bytes_ratio"] = r["weight_bytes"] / base["weight_bytes"]
    return {"mode": "weights", "device": device, "machine": machine(), "params": params,
            "llm": vars(llm) | {"rope_scaling": str(llm.rope_scaling)}, "streams": streams,
            "single_tokens": single_tokens, "stream_tokens": stream_tokens, "prompt_len": args.prompt_len,
            "repeat": args.repeat, "rows": rows}


def weights_table(res: dict) -> str:
    n, base = res["streams"], res["rows"][0]["weights"]
    lines = [f"| weights | weight MiB | x {base} | 1 stream tok/s | x {base} | {n} streams tok/s | x {base} |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['weights']} | {r['weight_bytes'] / 2**20:.1f} | {r['bytes_ratio']:.2f} | "
                     f"{r['single_tok_s']:.1f} | {r['single_ratio']:.2f} | {r['streams_tok_s']:.1f} | "
                     f"{r['streams_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="InternVL2-8B LLM shape, bf16, on CUDA")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--shared-prefix", type=int, default=48, help="chat workload: tokens shared by all prompts")
    ap.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=["chat", "unique"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--baseline-requests", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="rounds per figure; the best is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: every CPU)")
    ap.add_argument("--block-size", type=int, default=0, help="GPU: KV block size (default 256 with flash-attn)")
    ap.add_argument("--single-tokens", type=int, default=256)
    ap.add_argument("--agg-tokens", type=int, default=128)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="GPU: decoder layers stay eager")
    ap.add_argument("--compile-mode", default="default", help="GPU: torch.compile mode of the layers")
    ap.add_argument("--profile", type=Path, nargs="?", const=Path("/dev/null"), default=None,
                    help="GPU: print kernel times of the batch-1 decode graph (full table to PATH)")
    ap.add_argument("--smoke", action="store_true", help="with --gpu: run that code path on CPU, tiny model")
    ap.add_argument("--compare-weights", action="store_true",
                    help="int8 vs unquantised weights side by side (CPU: fp32, int8, bf16; --gpu: bf16, int8)")
    ap.add_argument("--weights-streams", type=int, default=0,
                    help="--compare-weights: concurrent streams (default 16 on CPU, 64 with --gpu)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.gpu and not torch.cuda.is_available() and not args.smoke:
        ap.error("--gpu needs a CUDA device (or --smoke to try the code path on CPU)")
    if args.gpu and not args.block_size:
        from services.language_decoder.engine.attention import flash_attn_with_kvcache

        args.block_size = 256 if flash_attn_with_kvcache is not None else 16
    if args.compare_weights:
        res = bench_weights(args)
        table = weights_table(res)
    elif args.gpu:
        res = bench_gpu(args)
        table = gpu_table(res)
    else:
        res = bench_cpu(args)
        table = cpu_table(res)
    print(table)
    print(json.dumps(res, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
