"""A real, throwaway `redis-server` process for integration and fault tests.

Tests talk to an actual Redis (not a fake) because the behaviour under test is Redis's own:
TTLs, atomic list pushes, Lua scripts, `maxmemory` OOM replies, a server that disappears.
Each server lives in its own temporary directory on a free loopback port. By default it never
persists anything (`--save '' --appendonly no`), so a restart comes back empty, like a fresh replica;
given one of the deployments' config files (`SESSIONS_CONF`: noeviction + append-only file,
`FEATURES_CONF`: LRU) it runs exactly that configuration, and a restart replays its append-only file.

`RedisClusterServers` starts a real Redis Cluster: N `redis-server --cluster-enabled yes` nodes on
free loopback ports, joined by `redis-cli --cluster create`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# Lets a machine without redis-server on PATH point at a binary elsewhere.
REDIS_SERVER_ENV = "REDIS_SERVER"
_FALLBACK_BINARY = "/usr/bin/redis-server"
_CONF_DIR = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "redis"
SESSIONS_CONF = _CONF_DIR / "sessions.conf"
FEATURES_CONF = _CONF_DIR / "features.conf"
CLUSTER_BUS_OFFSET = 10000  # Redis Cluster's node-to-node bus listens on port + 10000


class RedisServerMissing(RuntimeError):
    """No redis-server binary: the integration tests cannot run (they must fail, not skip)."""


def find_redis_server() -> str:
    override = os.environ.get(REDIS_SERVER_ENV)
    candidate = override or shutil.which("redis-server") or _FALLBACK_BINARY
    if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
        where = f"{REDIS_SERVER_ENV}={override}" if override else f"PATH and {_FALLBACK_BINARY}"
        raise RedisServerMissing(
            f"redis-server not found (looked at {where}); the Redis integration tests need a real "
            f"server: install it (`make setup` or `apt-get install redis-server`) or set "
            f"{REDIS_SERVER_ENV}=/path/to/redis-server"
        )
    return candidate


def free_port() -> int:
    """A port the kernel just considered free; racy by nature, so `start` retries on a clash."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(port: int, timeout_s: float = 0.2) -> bool:
    """Raw RESP PING, so waiting for the server needs no client library (or event loop)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port


def command(port: int, *args: str, timeout_s: float = 2.0) -> bytes:
    """One command in RESP, its raw reply (enough for INFO-like bulk strings); b"" on failure."""
    request = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(request)
            data = s.recv(65536)
            if data.startswith(b"$"):  # a bulk string: read all of it
                header, _, rest = data.partition(b"\r\n")
                want = int(header[1:])
                while len(rest) < want:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
                return rest[:want]
            return data
    except OSError:
        return b""


_PROCESS_ID = re.compile(rb"process_id:(\d+)\r\n")


def server_pid(port: int, timeout_s: float = 0.2) -> int | None:
    """The pid of whatever Redis answers on `port` (from INFO), to tell ours from a port thief."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while (match := _PROCESS_ID.search(data)) is None:
                chunk = s.recv(4096)
                if not chunk:
                    return None
                data += chunk
    except OSError:
        return None
    return int(match.group(1))


@dataclass
class RedisServer:
    """One redis-server process; `stop`/`start`/`restart`/`pause`/`resume` drive fault tests.

    A restart reuses the port so clients holding the URL reconnect to the new process.
    """

    workdir: Path
    maxmemory: str | None = None  # e.g. "2mb"; None = unlimited
    maxmemory_policy: str | None = None  # e.g. "noeviction", "allkeys-lru"
    config_file: Path | None = None  # SESSIONS_CONF / FEATURES_CONF; None = persist nothing
    extra_args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    binary: str = field(default_factory=find_redis_server)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _paused: bool = field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "redis.stderr"

    def _argv(self) -> list[str]:
        argv = [self.binary, *([str(self.config_file)] if self.config_file else []), "--port", str(self.port),
                "--bind", "127.0.0.1", "--dir", str(self.workdir), "--logfile", str(self.log_path)]
        if self.config_file is None:
            argv += ["--save", "", "--appendonly", "no"]
        argv += list(self.extra_args)
        if self.maxmemory is not None:
            argv += ["--maxmemory", self.maxmemory]
        if self.maxmemory_policy is not None:
            argv += ["--maxmemory-policy", self.maxmemory_policy]
        return argv

    def start(self, timeout_s: float = 10.0, attempts: int = 3, keep_port: bool = False) -> RedisServer:
        """Start and wait for PING; a port lost to a race is replaced unless `keep_port`."""
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            # Output to a file, not a pipe: nobody reads a pipe while the server runs, and a full
            # one would block it.
            with self.stderr_path.open("ab") as out:
                self._proc = subprocess.Popen(self._argv(), stdout=out, stderr=out, cwd=self.workdir)
            if self._wait_ready(timeout_s):
                return self
            clashed = self._proc.poll() is not None  # exited early: most likely the port was taken
            self._kill()
            if not clashed or keep_port or attempt == attempts - 1:
                break
            self.port = free_port()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}:\n{self._log_tail()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            # Ours, not another test's server that raced us to the same free port.
            if ping(self.port) and server_pid(self.port) == self._proc.pid:
                return True
            time.sleep(0.01)
        return False

    def _log_tail(self, lines: int = 20) -> str:
        text = ""
        for path in (self.log_path, self.stderr_path):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._paused = False  # SIGKILL ends a SIGSTOPped process too
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)

    def stop(self) -> None:
        """Kill the server abruptly (SIGKILL): what a crashed or partitioned Redis looks like."""
        self._kill()

    def restart(self) -> RedisServer:
        """Stop, then start on the same port; the data is gone unless its config persists it."""
        self.stop()
        return self.start(keep_port=True)

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers, so clients hit their timeouts."""
        if self.running and not self._paused:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
            self._paused = False

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class RedisClusterServers:
    """A real Redis Cluster of `size` masters (no replicas) on loopback; `url` is redis+cluster://."""

    workdir: Path
    size: int = 3
    config_file: Path | None = None
    maxmemory: str | None = None
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self, timeout_s: float = 30.0) -> RedisClusterServers:
        try:
            for i in range(self.size):
                node = RedisServer(self.workdir / f"node{i}", maxmemory=self.maxmemory, config_file=self.config_file,
                                   port=free_cluster_port(),
                                   extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                               "--cluster-node-timeout", "5000"))
                self.nodes.append(node.start())
            cli = str(Path(self.nodes[0].binary).with_name("redis-cli"))
            if not os.access(cli, os.X_OK):
                cli = shutil.which("redis-cli") or cli
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            created = subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                                      "--cluster-yes"], capture_output=True, text=True, timeout=timeout_s)
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
            self._wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, timeout_s: float) -> None:
        """Every node reports cluster_state:ok and knows all masters (the slot map has spread)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            infos = [command(node.port, "CLUSTER", "INFO") for node in self.nodes]
            if all(b"cluster_state:ok" in i and f"cluster_known_nodes:{self.size}".encode() in i for i in infos):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the Redis Cluster did not reach cluster_state:ok in {timeout_s:.0f}s")

    def node_for_key(self, key: str) -> RedisServer:
        slot = int(command(self.nodes[0].port, "CLUSTER", "KEYSLOT", key).strip(b":\r\n"))
        for node in self.nodes:
            for line in command(node.port, "CLUSTER", "NODES").decode().splitlines():
                fields = line.split()
                if "myself" not in fields[2]:
                    continue
                for spec in fields[8:]:
                    low, _, high = spec.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return node
        raise LookupError(f"no node serves the slot of {key!r}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
