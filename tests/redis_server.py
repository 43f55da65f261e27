"""A real, throwaway `redis-server` process for integration and fault tests.

Tests talk to an actual Redis (not a fake) because the behaviour under test is Redis's own:
TTLs, atomic list pushes, Lua scripts, `maxmemory` OOM replies, a server that disappears.
Each server lives in its own temporary directory on a free loopback port and never persists
anything (`--save '' --appendonly no`), so a restart comes back empty, like a fresh replica.
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
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(self.log_path)]
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
        """Stop, then start on the same port; the data is gone (nothing is persisted)."""
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
