"""The whole system on this machine, in one command: `python -m services.tools.run_local [--demo]`.

Starts, as child processes: two `redis-server`s (unless `--redis-url` is given), each on a free
loopback port with the deployments' own config file from deploy/k8s/redis/ — the session store
(`noeviction`, append-only file in `<run-dir>/redis-sessions-data`, so sessions outlive a restart of
this launcher) and the feature cache (LRU, nothing persisted, a temporary directory) —, the vision
encoder and the language decoder
(at the same time; one after the other when they share a GPU, so that the decoder sizes its KV cache
around the encoder), then the gateway once both are SERVING. Without `--model` it serves the built-in
tiny checkpoint `.cache/tiny-internvl2` (random weights, gibberish answers), writing it first with
`python -m services.tools.make_tiny_checkpoint` if it is missing.

Every child's output goes to `<run-dir>/{redis-sessions,redis-features,encoder,decoder,gateway}.log`
(default `.cache/run/`, overwritten by the next run). When all answer (gRPC health SERVING, Redis PING) it prints the
gateway address and then either

- serves in the foreground until Ctrl-C or SIGTERM, then stops the children in order: gateway
  first (no new requests), then decoder and encoder, then the two Redis; or
- with `--demo`, sends one chat with the client CLI (`python -m gateway.cli`, answer streamed to
  stdout) and stops everything; with `--demo --keep-serving` it stays up after the demo instead.

The gateway is open (no API key) when it listens on loopback only, the default; `--api-keys-file`
makes it require keys (the demo then sends the first one), and a `--host` beyond loopback needs keys.
The encoder and decoder always listen on 127.0.0.1 in PLAINTEXT: only processes on this machine reach
them, and any of them could call the models directly (and fill the decoder's caches). That is the
trust boundary of this launcher; deployments (deploy/) run them with mutual TLS instead.

A child that exits, or does not become SERVING within `--start-timeout`, stops the whole run with
an error that carries the tail of its log. This module is torch-free: it only starts processes.

    python -m services.tools.run_local --demo
    python -m services.tools.run_local --model /models/InternVL2-8B \\
        --encoder-device cuda:0 --decoder-device cuda:1
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.argv_secrets import argv_secret_problem
from services.common.quantization import NO_QUANTIZATION, QUANTIZE_CHOICES
from services.common.security import is_loopback_host

PROG = "run_local"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TINY = Path(".cache/tiny-internvl2")
DEFAULT_RUN_DIR = Path(".cache/run")
DEMO_IMAGE = REPO_ROOT / "tests/fixtures/parity/dev/images/img0_800x600.png"
DEMO_QUESTION = "Describe the image."
REDIS_SERVER_ENV = "REDIS_SERVER"
REDIS_CONF_DIR = REPO_ROOT / "deploy" / "k8s" / "redis"  # the same files compose and Kubernetes run
SESSIONS_DATA = "redis-sessions-data"
API_KEYS_ENV = "IVL_GATEWAY_API_KEYS"  # the gateway's own; its first key is the demo's
REDIS_URL_ENV = "IVL_REDIS_URL"  # --redis-url's default: a URL with a password is given here only
CLIENT_KEY_ENV = "IVL_API_KEY"  # what gateway.cli sends
_SERVING = health_pb2.HealthCheckResponse.SERVING

# Run in each child before it execs its program: ask the kernel to SIGTERM the child when this
# launcher dies (even by SIGKILL), so no service outlives it. (preexec_fn would do the same, but is
# unsafe in a process that has gRPC threads.) Linux only; elsewhere it just execs.
_DEATH_SIGNAL_SHIM = """\
import os, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    if os.getppid() != int(sys.argv[1]):  # the launcher died before prctl
        sys.exit(1)
except (OSError, AttributeError):
    pass
os.execvp(sys.argv[2], sys.argv[2:])
"""


class LaunchError(RuntimeError):
    """The stack could not be started; the message says which process and shows its log tail."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM while starting."""


def port_or_free(host: str, port: int) -> int:
    """`port` if nothing listens there now, else a free one (0 = a free one)."""
    if port:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                pass
    return free_port("127.0.0.1" if host in ("0.0.0.0", "localhost") else host)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, max_bytes: int = 6000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return "(no log)"


def say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


@dataclass
class Child:
    """One child process: its command (without the port), log file and chosen port."""

    name: str
    argv: list[str]  # the program and its arguments, minus the port flag
    log_path: Path
    port: int  # 0 = a free port, chosen at spawn time (and re-chosen if the bind races)
    host: str = "127.0.0.1"
    port_flag: str = "--port"
    cwd: str | None = None
    proc: subprocess.Popen | None = None
    chosen_port: int = 0
    auto_port: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.auto_port = self.port == 0

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.chosen_port}"

    def spawn(self, env: dict[str, str]) -> None:
        self.chosen_port = free_port() if self.auto_port else self.port
        argv = [*self.argv, self.port_flag, str(self.chosen_port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DEATH_SIGNAL_SHIM, str(os.getpid()), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                # Its own session: a terminal's Ctrl-C reaches only the launcher, which then stops
                # the children in order (gateway first) instead of all at once.
                start_new_session=True,
            )
        say(f"started {self.name} (pid {self.proc.pid}) on {self.address}, log {self.log_path}")

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def reap(self) -> int | None:
        """SIGKILL if still running, wait, forget the process; its exit code (negative: a signal)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            say(f"{self.name} still running; killing it")
            proc.kill()
        return proc.wait()

    def describe_exit(self) -> str:
        code = self.exited()
        return f"{self.name} exited with code {code}; last lines of {self.log_path}:\n{log_tail(self.log_path)}"


class Stack:
    """Starts and stops the children; `stop_requested` is set by SIGINT/SIGTERM."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run_dir: Path = args.run_dir
        self.children: list[Child] = []  # in start order
        # store name ("sessions", "features") -> URL; both the given --redis-url, or our own servers'
        self.redis_urls: dict[str, str] = dict.fromkeys(("sessions", "features"), args.redis_url or "")
        self.redis_dir: str | None = None  # the feature cache's throwaway directory
        self.http_port = 0  # the gateway's HTTP API (0 = none)
        self.signals = 0
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # -- signals --------------------------------------------------------------------------------

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1
        if self.signals == 1:
            say(f"{signal.Signals(signum).name}: stopping (again to kill at once)")
        else:
            say(f"{signal.Signals(signum).name} again: killing the children")

    @property
    def stop_requested(self) -> bool:
        return self.signals > 0

    def check_interrupt(self) -> None:
        if self.stop_requested:
            raise Interrupted

    # -- start ----------------------------------------------------------------------------------

    def start(self, model: str) -> str:
        """Everything up and healthy; returns the gateway address."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.args.redis_url:
            self.start_redis("sessions", str((self.run_dir / SESSIONS_DATA).resolve()),
                             self.args.session_redis_maxmemory, self.args.session_redis_port)
            self.redis_dir = tempfile.mkdtemp(prefix="internvl-redis-features-")
            self.start_redis("features", self.redis_dir, self.args.feature_redis_maxmemory,
                             self.args.feature_redis_port)
        a = self.args
        metrics = ["--metrics-port", "0"] if a.no_metrics else []
        common = ["--dtype", a.dtype, *metrics]
        py = sys.executable
        encoder_device, decoder_device = a.encoder_device or a.device, a.decoder_device or a.device
        encoder = Child("encoder", [py, "-m", "services.vision_encoder", "--model", model, "--device",
                                    encoder_device, *common, *shlex.split(a.encoder_args)],
                        self.run_dir / "encoder.log", a.encoder_port)
        decoder = Child("decoder", [py, "-m", "services.language_decoder", "--model", model, "--device",
                                    decoder_device, *common, "--quantize", a.quantize, *shlex.split(a.decoder_args)],
                        self.run_dir / "decoder.log", a.decoder_port)
        same = {encoder_device, decoder_device} <= {"cuda", "cuda:0"} or encoder_device == decoder_device
        if same and encoder_device != "cpu":
            # One accelerator for both: the decoder sizes its KV cache from the memory left free, so
            # the encoder's weights must already be there when it looks.
            self.launch([encoder])
            self.launch([decoder])
        else:
            self.launch([encoder, decoder])
        self.http_port = 0 if a.http_port < 0 else port_or_free(a.host, a.http_port)
        # The stores' URLs by environment: a --redis-url may hold a password, never put on a command line.
        self.env.update(IVL_SESSION_REDIS_URL=self.redis_urls["sessions"],
                        IVL_FEATURE_CACHE_URL=self.redis_urls["features"])
        gateway = Child("gateway", [py, "-m", "gateway", "--host", a.host, "--encoder", encoder.address,
                                    "--decoder", decoder.address, "--http-port", str(self.http_port),
                                    *self.auth_args(), *metrics, *shlex.split(a.gateway_args)],
                        self.run_dir / "gateway.log", a.port, host=a.host)
        self.launch([gateway])
        return gateway.address

    def auth_args(self) -> list[str]:
        """The gateway's API keys, or `--insecure-open` for a gateway only this machine can reach."""
        if self.args.api_keys_file:
            return ["--api-keys-file", str(self.args.api_keys_file)]
        if os.environ.get(API_KEYS_ENV):
            return []  # the gateway reads them itself
        return ["--insecure-open"]

    def start_redis(self, store: str, data_dir: str, maxmemory: str, port: int) -> None:
        """One store's redis-server with its deploy/k8s/redis/<store>.conf, on loopback."""
        binary = os.environ.get(REDIS_SERVER_ENV) or shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(binary, os.X_OK):
            raise LaunchError(
                f"redis-server not found ({binary}): install it (`make setup` or `apt-get install redis-server`), "
                f"set {REDIS_SERVER_ENV}=/path/to/redis-server, or give --redis-url"
            )
        os.makedirs(data_dir, exist_ok=True)
        # --logfile "": Redis logs to stdout, which is the log file.
        redis = Child(f"redis-{store}", [binary, str(REDIS_CONF_DIR / f"{store}.conf"), "--bind", "127.0.0.1",
                                         "--dir", data_dir, "--maxmemory", maxmemory, "--logfile", ""],
                      self.run_dir / f"redis-{store}.log", port, cwd=data_dir)
        self.children.append(redis)
        for attempt in range(3):
            redis.spawn(self.env)
            deadline = time.monotonic() + 60  # the session store first replays its append-only file
            while time.monotonic() < deadline:
                self.check_interrupt()
                if redis.exited() is not None:
                    break
                if _redis_ping(redis.chosen_port):
                    self.redis_urls[store] = f"redis://127.0.0.1:{redis.chosen_port}/0"
                    say(f"redis-{store} ready at {self.redis_urls[store]}")
                    return
                time.sleep(0.05)
            exited = redis.exited() is not None
            if not (exited and redis.auto_port and attempt < 2):
                raise LaunchError(redis.describe_exit() if exited else
                                  f"redis-server did not answer PING; log:\n{log_tail(redis.log_path)}")
            redis.reap()
            say(f"redis-{store} lost its port to another process; retrying on another")

    def launch(self, group: list[Child]) -> None:
        """Spawn the group together and wait until each is SERVING (retrying a lost port race)."""
        for child in group:
            self.children.append(child)
            child.spawn(self.env)
        attempts = {child.name: 1 for child in group}
        pending = list(group)
        deadline = time.monotonic() + self.args.start_timeout
        channels = {c.name: grpc.insecure_channel(c.address) for c in pending}
        try:
            while pending:
                self.check_interrupt()
                for child in list(pending):
                    if child.exited() is not None:
                        tail = log_tail(child.log_path)
                        if child.auto_port and "bind" in tail and attempts[child.name] < 3:
                            say(f"{child.name} lost its port to another process; retrying on another")
                            attempts[child.name] += 1
                            channels.pop(child.name).close()
                            child.reap()
                            child.spawn(self.env)
                            channels[child.name] = grpc.insecure_channel(child.address)
                            continue
                        hint = ""
                        if not child.auto_port and "bind" in tail:
                            hint = (f" (is port {child.chosen_port} taken? give another port, or 0 for a free one,"
                                    f" with --{'' if child.name == 'gateway' else child.name + '-'}port)")
                        raise LaunchError(f"{child.name} stopped before serving{hint}: {child.describe_exit()}")
                    if _serving(channels[child.name]):
                        say(f"{child.name} SERVING on {child.address}")
                        pending.remove(child)
                if pending and time.monotonic() > deadline:
                    late = pending[0]
                    raise LaunchError(
                        f"{', '.join(c.name for c in pending)} not SERVING after {self.args.start_timeout:.0f}s "
                        f"(--start-timeout); last lines of {late.log_path}:\n{log_tail(late.log_path)}"
                    )
                if pending:
                    time.sleep(0.2)
        finally:
            for channel in channels.values():
                channel.close()

    # -- run ------------------------------------------------------------------------------------

    def watch(self) -> None:
        """Until a signal; raises LaunchError if a child dies on its own."""
        while not self.stop_requested:
            for child in self.children:
                if child.exited() is not None:
                    raise LaunchError(f"{child.name} stopped unexpectedly: {child.describe_exit()}")
            time.sleep(0.2)

    # -- stop -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Gateway first (it stops taking requests), then the model services, then Redis.

        Each stage gets SIGTERM and `--stop-timeout` seconds (the services drain in-flight calls),
        then SIGKILL; a second Ctrl-C/SIGTERM kills whatever is left at once.
        """
        by_name = {c.name: c for c in self.children}
        for stage in (["gateway"], ["decoder", "encoder"], ["redis-sessions", "redis-features"]):
            group = [by_name[n] for n in stage if n in by_name and by_name[n].proc is not None]
            if not group:
                continue
            say("stopping " + " and ".join(c.name for c in group))
            for child in group:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGKILL if self.signals > 1 else signal.SIGTERM)
            deadline = time.monotonic() + self.args.stop_timeout
            while time.monotonic() < deadline and any(c.proc is not None and c.proc.poll() is None for c in group):
                if self.signals > 1:
                    break
                time.sleep(0.05)
            for child in group:
                say(f"{child.name} exited with code {child.reap()}")
        if self.redis_dir is not None:
            shutil.rmtree(self.redis_dir, ignore_errors=True)
            self.redis_dir = None
        say("all stopped")


def _serving(channel: grpc.Channel) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
    except grpc.RpcError:
        return False
    return reply.status == _SERVING


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def ensure_tiny_checkpoint(out: Path, env: dict[str, str]) -> Path:
    """The tiny checkpoint at `out`, written (to a temporary sibling, then renamed) if missing."""
    if (out / "config.json").is_file():
        return out
    say(f"no checkpoint at {out}: writing the tiny one (python -m services.tools.make_tiny_checkpoint)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "services.tools.make_tiny_checkpoint", "--out", str(tmp)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        if done.returncode != 0:
            raise LaunchError(f"make_tiny_checkpoint failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
        tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is not
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent run that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def demo_command(target: str, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "gateway.cli", "--target", target, "--max-new-tokens",
           str(args.demo_max_new_tokens)]
    image = args.demo_image
    if image is None and DEMO_IMAGE.is_file():
        image = DEMO_IMAGE
    if image is not None:
        cmd += ["--image", str(image)]
    return [*cmd, args.demo_question]


def first_api_key(args: argparse.Namespace) -> str:
    """The first key the gateway accepts ('' when it is open), read as the gateway reads them."""
    from services.common.security import load_api_keys, parse_key_entry  # grpc only, no torch

    try:
        keys = load_api_keys(str(args.api_keys_file or ""), os.environ.get(API_KEYS_ENV, ""))
    except ValueError as exc:
        raise LaunchError(str(exc)) from exc
    return parse_key_entry(keys[0])[1] if keys else ""


def demo_env(args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    key = first_api_key(args)
    return {**env, CLIENT_KEY_ENV: key} if key and not env.get(CLIENT_KEY_ENV) else env


def _python_for_humans() -> str:
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return "python" if shutil.which("python") == str(exe) else str(exe)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m services.tools.run_local",
        description="Run redis-server, the vision encoder, the language decoder and the gateway on this machine.",
    )
    p.add_argument("--model", help=f"checkpoint directory or Hub repo id (default: the tiny checkpoint {DEFAULT_TINY}, "
                                   "written if missing)")
    p.add_argument("--device", default="auto", help="torch device of both model services (auto: cuda if available)")
    p.add_argument("--encoder-device", help="device of the vision encoder (e.g. cuda:0); default --device")
    p.add_argument("--decoder-device", help="device of the language decoder (e.g. cuda:1); default --device")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="compute dtype of both model services (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--quantize", default=NO_QUANTIZATION, choices=QUANTIZE_CHOICES,
                   help="int8: the language decoder's block weights as int8 (half of bf16's memory; output close "
                        "to, not identical with, none); the vision encoder is unchanged")
    p.add_argument("--host", default="127.0.0.1", help="gateway bind address (0.0.0.0 to serve beyond this machine)")
    p.add_argument("--port", type=int, default=50051, help="gateway port (0 = a free one)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="the gateway's OpenAI-compatible HTTP port (a free one when taken; -1 = no HTTP API)")
    p.add_argument("--encoder-port", type=int, default=0, help="encoder port on 127.0.0.1 (0 = a free one)")
    p.add_argument("--decoder-port", type=int, default=0, help="decoder port on 127.0.0.1 (0 = a free one)")
    p.add_argument("--api-keys-file", type=Path,
                   help=f"API keys the gateway accepts, one per line (or env {API_KEYS_ENV}); "
                        "needed with a --host beyond loopback. Without keys a loopback gateway is open")
    p.add_argument("--insecure-open", action="store_true",
                   help="serve without API keys (the default on loopback; a non-loopback --host is refused)")
    p.add_argument("--no-metrics", action="store_true",
                   help="no Prometheus endpoints (default: the services' own, ports 9101-9103)")
    p.add_argument("--redis-url", default=os.environ.get(REDIS_URL_ENV) or None,
                   help="use this Redis for both stores instead of starting two redis-servers (the gateway then "
                        f"warns that one eviction policy serves both); with a password: env {REDIS_URL_ENV} only")
    p.add_argument("--session-redis-port", type=int, default=0, help="port of the session store (0 = a free one)")
    p.add_argument("--feature-redis-port", type=int, default=0, help="port of the feature cache (0 = a free one)")
    p.add_argument("--session-redis-maxmemory", default="1gb",
                   help="the session store's bound: beyond it new turns fail with RESOURCE_EXHAUSTED (default 1gb)")
    p.add_argument("--feature-redis-maxmemory", default="1gb",
                   help="the feature cache's bound: beyond it the least recently used features leave (default 1gb)")
    p.add_argument("--encoder-args", default="", help='extra flags for the encoder, e.g. "--max-batch-tiles 64"')
    p.add_argument("--decoder-args", default="", help='extra flags for the decoder, e.g. "--max-num-seqs 32"')
    p.add_argument("--gateway-args", default="", help='extra flags for the gateway, e.g. "--session-ttl 600"')
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help=f"children's logs (default {DEFAULT_RUN_DIR})")
    p.add_argument("--start-timeout", type=float, default=900.0,
                   help="seconds each start stage may take to become SERVING (model loading; default 900)")
    p.add_argument("--stop-timeout", type=float, default=40.0,
                   help="seconds a child gets after SIGTERM before SIGKILL (default 40)")
    p.add_argument("--demo", action="store_true", help="send one chat with the client CLI, print it, then stop")
    p.add_argument("--keep-serving", action="store_true", help="with --demo: keep serving after the demo")
    p.add_argument("--demo-question", default=DEMO_QUESTION)
    p.add_argument("--demo-image", type=Path,
                   help=f"image of the demo chat (default {DEMO_IMAGE.name} from the dev kit)")
    p.add_argument("--demo-max-new-tokens", type=int, default=128)
    args = p.parse_args(argv)
    secret = argv_secret_problem(sys.argv[1:] if argv is None else argv, REDIS_URL_ENV)
    if secret:
        p.error(secret)
    if args.keep_serving and not args.demo:
        p.error("--keep-serving goes with --demo (without --demo the stack always keeps serving)")
    for flag in ("port", "encoder_port", "decoder_port", "session_redis_port", "feature_redis_port"):
        if not 0 <= getattr(args, flag) <= 65535:
            p.error(f"--{flag.replace('_', '-')} must be in [0, 65535]")
    keys = bool(args.api_keys_file or os.environ.get(API_KEYS_ENV))
    if not is_loopback_host(args.host) and not keys:
        p.error(f"--host {args.host} serves beyond this machine: give the gateway API keys (--api-keys-file or "
                f"{API_KEYS_ENV}); an open gateway (--insecure-open) binds loopback only")
    if args.insecure_open and keys:
        p.error(f"--insecure-open contradicts the API keys given (--api-keys-file or {API_KEYS_ENV})")
    if args.api_keys_file is not None and not args.api_keys_file.is_file():
        p.error(f"--api-keys-file {args.api_keys_file}: no such file")
    tls = {"--tls-cert", "--tls-key", "--tls-ca"} & {arg.split("=")[0] for arg in shlex.split(args.gateway_args)}
    if tls:
        p.error(f"{', '.join(sorted(tls))}: this launcher runs a plaintext gateway for this machine; "
                "for TLS run the processes yourself (see deploy/)")
    if args.demo_image is not None and not args.demo_image.is_file():
        p.error(f"--demo-image {args.demo_image}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stack = Stack(args)
    previous = {sig: signal.signal(sig, stack.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        model = args.model or str(ensure_tiny_checkpoint(DEFAULT_TINY, stack.env))
        target = stack.start(model)
        auth = "API keys required" if first_api_key(args) else "open: no API key"
        say(f"gateway ready at {target} ({auth}; model {model}; logs in {args.run_dir}/)")
        say("encoder and decoder: plaintext on 127.0.0.1, no peer authentication (anyone on this machine can "
            "call them); deploy/ runs them with mutual TLS")
        if stack.http_port:
            host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
            say(f"OpenAI-compatible HTTP API at http://{host}:{stack.http_port}/v1 (model id: "
                f"{Path(model.rstrip('/')).name})")
        if args.demo:
            demo = demo_command(target, args)
            say(f"demo: {shlex.join([_python_for_humans(), *demo[1:]])}")
            code = subprocess.run(demo, stdin=subprocess.DEVNULL, env=demo_env(args, stack.env)).returncode
            if code != 0:
                say(f"the demo chat failed (exit {code}); gateway log: {args.run_dir / 'gateway.log'}")
        if not args.demo or (args.keep_serving and code == 0 and not stack.stop_requested):
            py = _python_for_humans()
            key_note = ""
            if first_api_key(args):
                key_note = f"  (the gateway wants an API key: export {CLIENT_KEY_ENV}=<one of its keys> first)\n"
            say(f"serving on {target}; ask more questions with:\n{key_note}"
                f"  {py} -m gateway.cli --target {target} --image photo.jpg \"What is in the picture?\"\n"
                f"  {py} -m gateway.cli --target {target} --new-session \"Hello\"   # then --session ID\n"
                f"Ctrl-C stops everything.")
            stack.watch()
    except Interrupted:
        code = 130
    except LaunchError as exc:
        say(f"error: {exc}")
        code = 1
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
