"""How fast one image's embeddings move over each hop, relative to a raw loopback TCP socket.

One 13-tile InternVL2-8B image is 13 x 256 x 4096 bf16 = 27,262,976 bytes. This bench moves exactly
those bytes over every hop they take in production, with no model anywhere (transport, not compute):

- raw socket: `sendall` into a peer process that `recv_into`s a preallocated buffer and acks (the floor);
- encoder -> gateway: a minimal aio `VisionEncoder.Encode` server (own process, the shared `GrpcServer`
  bootstrap) streams the same header + `DEFAULT_CHUNK_BYTES` chunks the real servicer sends, received
  and reassembled by the real `gateway.peers.EncoderClient.encode`;
- gateway -> decoder: the real `DecoderClient.generate` streams setup + chunks to a minimal aio
  `LanguageDecoder.Generate` server that reassembles them with `Reassembler` as the real servicer does
  and answers one `GenerateResponse`;
- encoder -> gateway -> decoder: both hops in sequence;
- Redis: `FeatureCache.put/get` (checksummed `encode_entry`/`decode_entry` included) against a real
  redis-server, next to raw `SET`/`GET` of the encoded value and the codec alone, to split the cost.

All peers run at once, each in its own process. Every hop first makes one untimed run that checks the
bytes arrive intact, then `--warmup` untimed runs; then `--repeats` rounds time every hop once per round
(interleaved, so background load on a shared machine hits all hops alike). Reported: median ms, MB/s
(10^6 embedding payload bytes per second), the ratio to the raw socket median of the same run, and the
CPU time the measuring (gateway-side) process spent per operation.

    .venv/bin/python -m bench.transfer [--repeats 20] [--warmup 3] [--chunk-bytes 2097152] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/transfer.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import google.protobuf  # noqa: E402
import grpc  # noqa: E402
import redis  # noqa: E402
import redis.utils  # noqa: E402

from gateway.feature_cache import (  # noqa: E402
    Entry,
    FeatureCache,
    FeatureCacheConfig,
    decode_entry,
    encode_entry,
    feature_key_for_hash,
    file_sha256,
    redis_client,
)
from gateway.peers import DecoderClient, EncoderClient  # noqa: E402
from internvl.v1 import decoder_pb2, decoder_pb2_grpc, tensor_pb2, vision_pb2, vision_pb2_grpc  # noqa: E402
from services.common.server import GrpcServer, ServerConfig, Service  # noqa: E402
from services.common.wire import DEFAULT_CHUNK_BYTES, Reassembler, iter_chunks, make_header  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

SHAPE_8B_13_TILES = (13, 256, 4096)  # one image at max 12 tiles + thumbnail, InternVL2-8B hidden size
DTYPE = tensor_pb2.DTYPE_BFLOAT16
ITEMSIZE = 2
SEED = 1234
VERIFY = "verify"  # request_id asking the fake decoder to checksum what it reassembled
_SINK_HEADER = struct.Struct("<QB")  # payload length, verify flag
_SINK_ACK = struct.Struct("<I")  # crc32 of what arrived (0 unless asked)


class TransferCorrupted(AssertionError):
    """The bytes that arrived differ from the bytes sent."""


def payload_nbytes(shape: Sequence[int]) -> int:
    n = ITEMSIZE
    for d in shape:
        n *= d
    return n


def make_payload(nbytes: int, seed: int = SEED) -> bytes:
    """Deterministic random bytes (the same in every process that needs them; incompressible)."""
    return random.Random(seed).randbytes(nbytes)


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    key: str
    name: str
    nbytes: int  # embedding payload bytes per operation
    samples_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # CPU of this (the gateway's) process, all threads
    verified: bool = False  # an untimed run checked the bytes that arrived
    ratio: float | None = None  # median / raw socket median, filled in by `run`

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def cpu_median_ms(self) -> float:
        return statistics.median(self.cpu_ms)

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / (self.median_ms / 1e3) / 1e6

    def as_dict(self) -> dict:
        return {
            "key": self.key, "name": self.name, "nbytes": self.nbytes, "median_ms": round(self.median_ms, 3),
            "min_ms": round(min(self.samples_ms), 3), "max_ms": round(max(self.samples_ms), 3),
            "mb_per_s": round(self.mb_per_s, 1), "cpu_median_ms": round(self.cpu_median_ms, 3),
            "ratio_to_raw_socket": None if self.ratio is None
            else round(self.ratio, 2), "verified": self.verified,
            "samples_ms": [round(s, 3) for s in self.samples_ms], "cpu_ms": [round(s, 3) for s in self.cpu_ms],
        }


@dataclass
class Op:
    """One hop to time: `fn` moves the payload once (its bytes were checked when the Op was made)."""

    result: Result
    fn: Callable[[], Awaitable[object]]


async def measure(ops: Sequence[Op], repeats: int, warmup: int) -> list[Result]:
    """Warm every op up, then time them round-robin: one run of each op per round.

    Interleaving spreads any background load (a shared machine) evenly over all hops, so the ratios
    to the raw socket stay meaningful even when absolute times drift.
    """
    for op in ops:
        for _ in range(warmup):
            await op.fn()
    for _ in range(repeats):
        for op in ops:
            cpu, start = time.process_time(), time.perf_counter()
            await op.fn()
            op.result.samples_ms.append((time.perf_counter() - start) * 1e3)
            op.result.cpu_ms.append((time.process_time() - cpu) * 1e3)
    return [op.result for op in ops]


# ----------------------------------------------------------------------------------------------
# Peer processes (spawned: a clean interpreter each, as in a deployment; they announce a port)


@contextlib.contextmanager
def _peer(target: Callable, *args: object, start_timeout_s: float = 60.0) -> Iterator[int]:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(theirs, *args), daemon=True)
    proc.start()
    theirs.close()  # so a peer that dies before announcing its port reads as EOF here
    try:
        if not ours.poll(start_timeout_s):
            raise RuntimeError(f"{target.__name__}: no port after {start_timeout_s:.0f}s")
        try:
            port = ours.recv()
        except EOFError:
            raise RuntimeError(f"{target.__name__}: the peer process exited (code {proc.exitcode})") from None
        yield port
    finally:
        with contextlib.suppress(OSError):
            ours.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        ours.close()


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view`; False on a clean EOF before the first byte."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError(f"peer closed after {got} of {len(view)} bytes")
        got += n
    return True


def _sink_main(conn, max_bytes: int) -> None:
    """Raw TCP receiver: per message, recv_into a preallocated buffer, then a 4-byte ack."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn.send(listener.getsockname()[1])
        sock, _ = listener.accept()
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = memoryview(bytearray(max_bytes))
        header = memoryview(bytearray(_SINK_HEADER.size))
        while _recv_exact(sock, header):
            n, verify = _SINK_HEADER.unpack(header)
            if not _recv_exact(sock, buf[:n]):
                raise ConnectionError("peer closed before the payload")
            sock.sendall(_SINK_ACK.pack(zlib.crc32(buf[:n]) if verify else 0))


class _FakeEncoder(vision_pb2_grpc.VisionEncoderServicer):
    """Streams pre-made embeddings exactly as VisionEncoderServicer.Encode does (header, then chunks)."""

    def __init__(self, shape: Sequence[int], chunk_bytes: int):
        self.shape = tuple(shape)
        self.payload = make_payload(payload_nbytes(shape))
        self.chunk_bytes = chunk_bytes

    async def Encode(self, request, context):
        header = make_header(DTYPE, self.shape)
        yield vision_pb2.EncodeResponse(header=vision_pb2.EmbeddingHeader(index=0, num_tiles=self.shape[0],
                                                                           tensor=header))
        for chunk in iter_chunks(self.payload, self.chunk_bytes):
            yield vision_pb2.EncodeResponse(chunk=chunk)


class _FakeDecoder(decoder_pb2_grpc.LanguageDecoderServicer):
    """Reassembles every image's chunks as LanguageDecoderServicer does, then answers once (no model)."""

    async def Generate(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("setup"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry the setup")
        images = list(first.setup.images)
        done: list[bytearray] = []
        if images:
            buf = Reassembler(images[0].tensor)
            async for msg in request_iterator:
                data = msg.chunk
                while data:
                    if len(done) >= len(images):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "more bytes than announced")
                    taken = buf.feed(data)
                    data = data[taken:]
                    if buf.complete:
                        done.append(buf.result())
                        if len(done) < len(images):
                            buf = Reassembler(images[len(done)].tensor)
                if len(done) == len(images):
                    break
        if len(done) < len(images):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"only {len(done)} of {len(images)} images")
        nbytes = sum(len(b) for b in done)
        text = str(nbytes)
        if first.setup.request_id == VERIFY:
            crc = 0
            for b in done:
                crc = zlib.crc32(b, crc)
            text += f":{crc:08x}"
        yield decoder_pb2.GenerateResponse(text=text, finish_reason=decoder_pb2.FINISH_REASON_STOP,
                                           usage=decoder_pb2.Usage(prompt_tokens=1, completion_tokens=0))


def _grpc_main(conn, kind: str, shape: Sequence[int], chunk_bytes: int) -> None:
    asyncio.run(_serve(conn, kind, shape, chunk_bytes))


async def _serve(conn, kind: str, shape: Sequence[int], chunk_bytes: int) -> None:
    if kind == "encoder":
        name = vision_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name
        service = Service(name, vision_pb2_grpc.add_VisionEncoderServicer_to_server, _FakeEncoder(shape, chunk_bytes))
    else:
        name = decoder_pb2.DESCRIPTOR.services_by_name["LanguageDecoder"].full_name
        service = Service(name, decoder_pb2_grpc.add_LanguageDecoderServicer_to_server, _FakeDecoder())
    server = GrpcServer(ServerConfig(port=0, grace_seconds=1.0), [service])
    port = await server.start()
    await server.set_serving(True)
    conn.send(port)
    with contextlib.suppress(EOFError, OSError):
        await asyncio.to_thread(conn.recv)  # "stop", or EOF when the parent goes away
    await server.stop()


# ----------------------------------------------------------------------------------------------
# Hops


@contextlib.asynccontextmanager
async def raw_socket_ops(payload: bytes) -> AsyncIterator[list[Op]]:
    """The floor: the same bytes over one persistent loopback TCP connection to another process."""
    result = Result("raw_socket", "raw loopback TCP socket (sendall -> recv_into)", len(payload))
    with _peer(_sink_main, len(payload)) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ack = memoryview(bytearray(_SINK_ACK.size))

        def send(verify: bool = False) -> int:
            sock.sendall(_SINK_HEADER.pack(len(payload), verify))
            sock.sendall(payload)
            if not _recv_exact(sock, ack):
                raise ConnectionError("the sink closed")
            return _SINK_ACK.unpack(ack)[0]

        async def send_async() -> int:
            return send()  # blocking on purpose: nothing else runs while an op is timed

        if send(verify=True) != zlib.crc32(payload):
            raise TransferCorrupted("raw socket: checksum mismatch")
        result.verified = True
        yield [Op(result, send_async)]


def _encode_request() -> vision_pb2.EncodeRequest:
    return vision_pb2.EncodeRequest(images=vision_pb2.ImageList(images=[vision_pb2.ImageInput(data=b"bench")]))


def _setup(entry: Entry, request_id: str) -> decoder_pb2.GenerateSetup:
    return decoder_pb2.GenerateSetup(
        conversation=decoder_pb2.Conversation(question="<image>\nDescribe the image."),
        images=[decoder_pb2.ImageDescriptor(num_tiles=entry.num_tiles, feature_key="0" * 64,
                                            tensor=entry.tensor_header())],
        request_id=request_id,
    )


@contextlib.asynccontextmanager
async def grpc_ops(
    payload: bytes, shape: Sequence[int], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> AsyncIterator[list[Op]]:
    """encoder -> gateway, gateway -> decoder, and both in sequence, each peer in its own process."""
    if len(payload) != payload_nbytes(shape) or payload != make_payload(len(payload)):
        raise ValueError("payload must be make_payload(payload_nbytes(shape)): the encoder peer regenerates it")
    n = len(payload)
    crc = zlib.crc32(payload)
    enc = Result("encoder_to_gateway", "encoder -> gateway (Encode stream + EncoderClient reassembly)", n)
    dec = Result("gateway_to_decoder", "gateway -> decoder (DecoderClient.generate + Reassembler)", n)
    e2e = Result("encoder_gateway_decoder", "encoder -> gateway -> decoder (both hops)", n)
    with _peer(_grpc_main, "encoder", tuple(shape), chunk_bytes) as enc_port, \
            _peer(_grpc_main, "decoder", tuple(shape), chunk_bytes) as dec_port:
        encoder = EncoderClient(f"127.0.0.1:{enc_port}")
        decoder = DecoderClient(f"127.0.0.1:{dec_port}", chunk_bytes=chunk_bytes)
        try:
            async def encode() -> Entry:
                items = await encoder.encode(_encode_request(), timeout=60)
                if len(items) != 1:
                    raise TransferCorrupted(f"encoder: {len(items)} items")
                return items[0][1]

            async def generate(entry: Entry, request_id: str = "bench") -> str:
                text = ""
                async for resp in decoder.generate(_setup(entry, request_id), [entry], timeout=60):
                    text += resp.text
                return text

            async def both(request_id: str = "bench") -> str:
                return await generate(await encode(), request_id)

            entry = await encode()
            if entry.payload != payload or entry.shape != tuple(shape):
                raise TransferCorrupted("encoder -> gateway: bytes or shape differ")
            enc.verified = True
            sent = Entry(DTYPE, tuple(shape), payload)
            if await generate(sent, VERIFY) != f"{n}:{crc:08x}":
                raise TransferCorrupted("gateway -> decoder: checksum mismatch")
            dec.verified = True
            if await both(VERIFY) != f"{n}:{crc:08x}":
                raise TransferCorrupted("encoder -> gateway -> decoder: checksum mismatch")
            e2e.verified = True

            yield [Op(enc, encode), Op(dec, lambda: generate(sent)), Op(e2e, both)]
        finally:
            await encoder.close()
            await decoder.close()


@contextlib.asynccontextmanager
async def redis_ops(payload: bytes, shape: Sequence[int], workdir: Path | None = None) -> AsyncIterator[list[Op]]:
    """FeatureCache.put/get (codec + checksum included) against raw SET/GET and the codec alone."""
    n = len(payload)
    entry = Entry(DTYPE, tuple(shape), payload)
    key = feature_key_for_hash(file_sha256(payload), max_tiles=12, min_tiles=1, use_thumbnail=True,
                               image_size=448, model_fingerprint="bench")
    raw_key = key + ":raw"
    encoded = encode_entry(entry)
    put = Result("cache_put", "Redis: FeatureCache.put (encode_entry + SET)", n)
    get = Result("cache_get", "Redis: FeatureCache.get (GET + decode_entry, crc verified)", n)
    raw_set = Result("redis_set", "Redis: raw SET of the encoded value", n)
    raw_get = Result("redis_get", "Redis: raw GET of the encoded value", n)
    enc_only = Result("encode_entry", "encode_entry alone (crc32 + join, no I/O)", n)
    dec_only = Result("decode_entry", "decode_entry alone (crc32 verify, no I/O)", n)

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-redis-")))
        server = stack.enter_context(RedisServer(workdir / "redis"))
        client = redis_client(server.url, timeout_s=30)
        cache = FeatureCache(client, FeatureCacheConfig(op_timeout_s=30, cross_replica_lock=False))
        try:
            async def cache_put() -> None:
                if not await cache.put(key, entry):
                    raise RuntimeError(f"FeatureCache.put failed: {cache.stats}")

            async def cache_get() -> Entry:
                got = await cache.get(key)
                if got is None:
                    raise RuntimeError(f"FeatureCache.get missed: {cache.stats}")
                return got

            async def set_raw() -> None:
                await client.set(raw_key, encoded)

            async def get_raw() -> bytes:
                return await client.get(raw_key)

            await cache_put()
            if (await cache_get()).payload != payload:
                raise TransferCorrupted("FeatureCache: bytes differ after put/get")
            put.verified = get.verified = True
            await set_raw()
            if await get_raw() != encoded:
                raise TransferCorrupted("Redis: raw GET differs from SET")
            raw_set.verified = raw_get.verified = True
            if decode_entry(encode_entry(entry)).payload != payload:
                raise TransferCorrupted("encode_entry/decode_entry round trip differs")
            enc_only.verified = dec_only.verified = True

            async def encode_only() -> bytes:
                return encode_entry(entry)

            async def decode_only() -> Entry:
                return decode_entry(encoded)

            yield [Op(put, cache_put), Op(get, cache_get), Op(raw_set, set_raw), Op(raw_get, get_raw),
                   Op(enc_only, encode_only), Op(dec_only, decode_only)]
        finally:
            await client.aclose()


async def bench_raw_socket(payload: bytes, repeats: int, warmup: int) -> list[Result]:
    async with raw_socket_ops(payload) as ops:
        return await measure(ops, repeats, warmup)


async def bench_grpc_hops(
    payload: bytes, shape: Sequence[int], repeats: int, warmup: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[Result]:
    async with grpc_ops(payload, shape, chunk_bytes) as ops:
        return await measure(ops, repeats, warmup)


async def bench_redis(
    payload: bytes, shape: Sequence[int], repeats: int, warmup: int, workdir: Path | None = None
) -> list[Result]:
    async with redis_ops(payload, shape, workdir) as ops:
        return await measure(ops, repeats, warmup)


# ----------------------------------------------------------------------------------------------
# The whole run


@dataclass
class Report:
    shape: tuple[int, ...]
    nbytes: int
    repeats: int
    warmup: int
    chunk_bytes: int
    baseline: Result
    results: list[Result]
    machine: dict
    elapsed_s: float

    def as_dict(self) -> dict:
        return {
            "payload": {"shape": list(self.shape), "dtype": "bf16", "nbytes": self.nbytes},
            "repeats": self.repeats, "warmup": self.warmup, "chunk_bytes": self.chunk_bytes,
            "results": [r.as_dict() for r in [self.baseline, *self.results]],
            "machine": self.machine, "elapsed_s": round(self.elapsed_s, 1),
        }

    def table(self) -> str:
        mib = self.nbytes / (1 << 20)
        lines = [
            f"Embedding transfer: {' x '.join(map(str, self.shape))} bf16 = {self.nbytes:,} bytes ({mib:.1f} MiB); "
            f"{self.repeats} rounds (every hop once per round) after {self.warmup} warm-up; "
            f"gRPC chunk {self.chunk_bytes:,} bytes",
            "",
            f"| {'hop':<62} | {'median ms':>9} | {'min..max ms':>13} | {'MB/s':>5} | {'x raw':>5} "
            f"| {'gw CPU ms':>9} |",
            f"|{'-' * 64}|{'-' * 10}:|{'-' * 14}:|{'-' * 6}:|{'-' * 6}:|{'-' * 10}:|",
        ]
        for r in [self.baseline, *self.results]:
            spread = f"{min(r.samples_ms):.1f}..{max(r.samples_ms):.1f}"
            lines.append(f"| {r.name:<62} | {r.median_ms:>9.2f} | {spread:>13} | {r.mb_per_s:>5.0f} | "
                         f"{r.ratio:>5.2f} | {r.cpu_median_ms:>9.1f} |")
        lines.append("")
        lines.append("MB/s = 10^6 payload bytes per second at the median; x raw = median / raw socket median; "
                     "gw CPU = CPU time of the measuring (gateway-side) process per operation, all its threads.")
        return "\n".join(lines)


def machine_info() -> dict:
    info: dict = {"nproc": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                  "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__,
                  "redis_py": redis.__version__, "hiredis": bool(redis.utils.HIREDIS_AVAILABLE)}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        from tests.redis_server import find_redis_server

        out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True, timeout=10)
        info["redis_server"] = out.stdout.split()[2].removeprefix("v=") if out.stdout else None
    info["date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return info


async def run_async(shape: Sequence[int] = SHAPE_8B_13_TILES, repeats: int = 20, warmup: int = 3,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Report:
    """Every hop, all peers up at once, timed round-robin; ratios to the raw socket median."""
    started = time.perf_counter()
    shape = tuple(shape)
    payload = make_payload(payload_nbytes(shape))
    async with raw_socket_ops(payload) as raw, grpc_ops(payload, shape, chunk_bytes) as hops, \
            redis_ops(payload, shape) as cache:
        baseline, *results = await measure([*raw, *hops, *cache], repeats, warmup)
    for r in [baseline, *results]:
        r.ratio = r.median_ms / baseline.median_ms
    return Report(shape, len(payload), repeats, warmup, chunk_bytes, baseline, results, machine_info(),
                  time.perf_counter() - started)


def run(shape: Sequence[int] = SHAPE_8B_13_TILES, repeats: int = 20, warmup: int = 3,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Report:
    return asyncio.run(run_async(shape, repeats, warmup, chunk_bytes))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per hop (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per hop first (default 3)")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                        help=f"gRPC chunk size on both hops (default {DEFAULT_CHUNK_BYTES}, the services' default)")
    parser.add_argument("--tiles", type=int, default=SHAPE_8B_13_TILES[0], help="tiles in the image (default 13)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (all samples included)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.chunk_bytes < 1 or args.tiles < 1:
        parser.error("need --repeats >= 1, --warmup >= 0, --chunk-bytes >= 1, --tiles >= 1")
    report = run((args.tiles, *SHAPE_8B_13_TILES[1:]), args.repeats, args.warmup, args.chunk_bytes)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.table())
        print(f"\n{report.machine}; {report.elapsed_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
