"""Load benchmark: N concurrent streaming clients against the whole stack on the tiny model.

Starts redis-server, the encoder, the decoder and the gateway as real processes on loopback (the
parity kit's tiny checkpoint by default; `tests/integration/hardening.py` launches them), warms
them up, then runs `--clients` concurrent clients for `--duration` seconds. Each client loops:
one `ChatStream` call at a time, text-only or with an image (`--image-fraction`; of those,
`--fresh-image-fraction` send an image never seen before, so the encoder runs, the rest reuse a
small pool whose features are cached). A client refused with RESOURCE_EXHAUSTED waits for the
`retry-after-ms` hint, as a well-behaved client would. Clients stop starting calls at the deadline;
calls still running then finish (each has a timeout), so the run always ends by itself.

Reports throughput (finished calls/s, generated tokens/s), latency and time-to-first-token p50/p99,
calls by status code, and the RSS of every process after warm-up, at its highest during the run, at
the end and after a short settle. The target: no status but OK and RESOURCE_EXHAUSTED, and memory
flat (the feature cache in Redis grows with fresh images by design, up to its TTL or maxmemory).

    .venv/bin/python bench/load.py [--clients 200] [--duration 60] [--json PATH]
        [--decoder-args "--max-queue-size 32"] [--model DIR]

Loopback only: nothing here listens beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import itertools
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc, vision_pb2  # noqa: E402
from services.common.server import channel_options  # noqa: E402
from tests.integration.hardening import Stack, start_stack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "tests" / "fixtures" / "parity" / "dev"
QUESTIONS = ["Hello, who are you?", "Tell me a short story.", "What is the capital of France?",
             "Describe the picture.", "List three colours.", "请用中文回答：你好吗？", "Summarise this in one line."]
CHANNELS = 8  # clients share a few HTTP/2 connections, as many clients behind a few proxies would


@dataclass
class Call:
    kind: str  # text | image | fresh_image
    code: str
    latency_s: float
    ttft_s: float | None
    tokens: int


@dataclass
class Mix:
    image_fraction: float
    fresh_image_fraction: float
    max_new_tokens: int
    pool: list[bytes]
    fresh: itertools.count = field(default_factory=lambda: itertools.count(1))

    def request(self, rng: random.Random) -> tuple[str, gateway_pb2.ChatRequest]:
        request = gateway_pb2.ChatRequest(text=rng.choice(QUESTIONS),
                                          generation=decoder_pb2.SamplingParams(max_new_tokens=self.max_new_tokens))
        if rng.random() >= self.image_fraction:
            return "text", request
        if rng.random() < self.fresh_image_fraction:
            kind, data = "fresh_image", fresh_png(next(self.fresh))
        else:
            kind, data = "image", rng.choice(self.pool)
        request.images.append(vision_pb2.ImageInput(data=data))
        return kind, request


def fresh_png(n: int) -> bytes:
    """A 448x448 (one tile) image no other call sent: its colour and a stripe encode n."""
    image = Image.new("RGB", (448, 448), (n % 256, (n // 256) % 256, 128))
    image.paste((255 - n % 256, 0, 0), (0, 0, 448, 1 + n % 64))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_pool(model_dir: Path) -> list[bytes]:
    kit_images = sorted((model_dir / "images").glob("*")) if (model_dir / "images").is_dir() else []
    return [p.read_bytes() for p in kit_images] + [fresh_png(10_000 + i) for i in range(8)]


async def one_call(stub, kind: str, request, timeout_s: float) -> tuple[Call, float]:
    """One streamed call; returns it and how long the server asked us to wait before the next."""
    started = time.monotonic()
    ttft, tokens, code, wait_s = None, 0, "OK", 0.0
    try:
        async for part in stub.ChatStream(request, timeout=timeout_s):
            if ttft is None:
                ttft = time.monotonic() - started
            if part.finish_reason:
                tokens = part.usage.completion_tokens
    except grpc.aio.AioRpcError as err:
        code = err.code().name
        hint = dict(err.trailing_metadata() or ()).get("retry-after-ms")
        if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            wait_s = int(hint) / 1000 if hint and hint.isdigit() else 1.0
    return Call(kind, code, time.monotonic() - started, ttft, tokens), wait_s


async def client(seed: int, stub, mix: Mix, deadline: float, timeout_s: float, calls: list[Call]) -> None:
    rng = random.Random(seed)
    await asyncio.sleep(rng.random())  # clients start spread over a second, not in lockstep
    while time.monotonic() < deadline:
        kind, request = mix.request(rng)
        call, wait_s = await one_call(stub, kind, request, timeout_s)
        calls.append(call)
        if wait_s:
            await asyncio.sleep(min(wait_s, max(0.0, deadline - time.monotonic())))


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def stack_pids(stack: Stack) -> dict[str, int]:
    pids = {name: svc.proc.pid for name, svc in
            (("gateway", stack.gateway), ("encoder", stack.encoder), ("decoder", stack.decoder))}
    pids["redis"] = stack.redis._proc.pid  # noqa: SLF001 - the test helper keeps the process private
    return pids


def memory(pids: dict[str, int]) -> dict[str, float | None]:
    return {name: rss_mib(pid) for name, pid in pids.items()}


async def sample_memory(pids: dict[str, int], every_s: float, peaks: dict[str, float], halfway_s: float,
                        halfway: dict[str, float | None], stop: asyncio.Event) -> None:
    """Track each process's peak RSS, and take one sample halfway through the run."""
    started = time.monotonic()
    while not stop.is_set():
        now = memory(pids)
        for name, value in now.items():
            if value is not None:
                peaks[name] = max(peaks.get(name, 0.0), value)
        if not halfway and time.monotonic() - started >= halfway_s:
            halfway.update(now)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def run_load(stack: Stack, mix: Mix, clients: int, duration_s: float, timeout_s: float) -> dict:
    channels = [grpc.aio.insecure_channel(stack.gateway.address, options=channel_options()) for _ in range(CHANNELS)]
    stubs = [gateway_pb2_grpc.GatewayStub(c) for c in channels]
    pids = stack_pids(stack)
    try:
        # Warm-up: every pool image once (so the pool is cached) and a few text calls.
        warm_rng = random.Random(0)
        for data in mix.pool:
            request = gateway_pb2.ChatRequest(text="Describe.", images=[vision_pb2.ImageInput(data=data)],
                                              generation=decoder_pb2.SamplingParams(max_new_tokens=4))
            await one_call(stubs[0], "image", request, timeout_s)
        await asyncio.gather(*(one_call(stubs[i % CHANNELS], *mix.request(warm_rng), timeout_s) for i in range(32)))
        before = memory(pids)

        calls: list[Call] = []
        peaks: dict[str, float] = {}
        halfway: dict[str, float | None] = {}
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(sample_memory(pids, 1.0, peaks, duration_s / 2, halfway, stop))
        started = time.monotonic()
        deadline = started + duration_s
        tasks = [client(i, stubs[i % CHANNELS], mix, deadline, timeout_s, calls) for i in range(clients)]
        # Bounded: no call outlives its timeout, so this ends by deadline + timeout at the latest.
        await asyncio.wait_for(asyncio.gather(*tasks), duration_s + timeout_s + 30)
        elapsed = time.monotonic() - started
        stop.set()
        await sampler
        end = memory(pids)
        await asyncio.sleep(3.0)
        settled = memory(pids)
    finally:
        for channel in channels:
            await channel.close()

    ok = [c for c in calls if c.code == "OK"]
    by_kind = Counter(c.kind for c in calls)
    return {
        "clients": clients,
        "duration_s": round(elapsed, 1),
        "calls": len(calls),
        "calls_by_kind": dict(by_kind),
        "codes": dict(Counter(c.code for c in calls)),
        "ok_per_s": round(len(ok) / elapsed, 1),
        "tokens_per_s": round(sum(c.tokens for c in ok) / elapsed, 1),
        "latency_s": {"p50": _r(percentile([c.latency_s for c in ok], 50)),
                      "p99": _r(percentile([c.latency_s for c in ok], 99))},
        "ttft_s": {"p50": _r(percentile([c.ttft_s for c in ok if c.ttft_s is not None], 50)),
                   "p99": _r(percentile([c.ttft_s for c in ok if c.ttft_s is not None], 99))},
        "latency_p50_by_kind_s": {k: _r(percentile([c.latency_s for c in ok if c.kind == k], 50)) for k in by_kind},
        # A leak shows as growth from halfway to the end; growth before halfway is mostly first use
        # (pages of the decoder's preallocated KV cache being touched, allocator pools filling up).
        "rss_mib": {name: {"after_warmup": _r(before[name], 1), "halfway": _r(halfway.get(name), 1),
                           "end": _r(end[name], 1), "settled": _r(settled[name], 1), "peak": _r(peaks.get(name), 1)}
                    for name in pids},
    }


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    return {"nproc": os.cpu_count(), "cpu": model, "ram_gib": round(mem_kib / 2**20, 1),
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            # Other work on the machine competes for the same cores: note how busy it was.
            "loadavg_1m_before": round(os.getloadavg()[0], 2)}


def report(result: dict) -> str:
    lat, ttft, rss = result["latency_s"], result["ttft_s"], result["rss_mib"]
    kinds = ", ".join(f"{k} {v}" for k, v in result["calls_by_kind"].items())
    rows = [
        "| metric | value |", "|---|---|",
        f"| clients / duration | {result['clients']} / {result['duration_s']} s |",
        f"| calls (by kind) | {result['calls']} ({kinds}) |",
        f"| status codes | {', '.join(f'{k} {v}' for k, v in sorted(result['codes'].items()))} |",
        f"| throughput | {result['ok_per_s']} calls/s, {result['tokens_per_s']} generated tokens/s |",
        f"| latency p50 / p99 | {lat['p50']} s / {lat['p99']} s |",
        f"| time to first token p50 / p99 | {ttft['p50']} s / {ttft['p99']} s |",
    ]
    rows += ["", "| RSS (MiB) | after warm-up | halfway | end | settled (+3 s) | peak |", "|---|---|---|---|---|---|"]
    rows += [f"| {name} | {v['after_warmup']} | {v['halfway']} | {v['end']} | {v['settled']} | {v['peak']} |"
             for name, v in rss.items()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load after warm-up")
    p.add_argument("--image-fraction", type=float, default=0.3)
    p.add_argument("--fresh-image-fraction", type=float, default=0.1, help="of the image calls")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=60.0, help="per-call deadline, seconds")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--encoder-args", default="", help="extra encoder flags, one string")
    p.add_argument("--decoder-args", default="", help="extra decoder flags, one string")
    p.add_argument("--gateway-args", default="", help="extra gateway flags, one string")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if not (args.clients >= 1 and args.duration > 0 and 0 <= args.image_fraction <= 1
            and 0 <= args.fresh_image_fraction <= 1):
        p.error("need --clients >= 1, --duration > 0 and fractions in [0, 1]")

    mix = Mix(args.image_fraction, args.fresh_image_fraction, args.max_new_tokens, image_pool(args.model))
    host = machine()
    with tempfile.TemporaryDirectory(prefix="ivl-load-") as workdir:
        print(f"starting the stack ({args.model}) ...", file=sys.stderr)
        stack = start_stack(args.model, Path(workdir), encoder_args=shlex.split(args.encoder_args),
                            decoder_args=shlex.split(args.decoder_args), gateway_args=shlex.split(args.gateway_args))
        try:
            print(f"{args.clients} clients for {args.duration:.0f} s ...", file=sys.stderr)
            result = asyncio.run(run_load(stack, mix, args.clients, args.duration, args.timeout))
        finally:
            stack.stop()
    result["machine"] = host
    result["command"] = shlex.join([".venv/bin/python", "bench/load.py", *(argv if argv is not None else sys.argv[1:])])
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
    print(report(result))
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    unexpected = {k: v for k, v in result["codes"].items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
