"""Run one of our gRPC services as a real subprocess for integration tests.

`ServiceProcess("services.vision_encoder", ["--model", DIR]).start()` launches
`python -m services.vision_encoder --model DIR --port P` on a free loopback port (the service must
accept `--port`, and `--host` if `host` is passed), waits until its gRPC health check answers
SERVING, and on failure raises with the tail of the process's output (stdout + stderr). `stop()`
sends SIGTERM (the services drain gracefully), then SIGKILL after a timeout; `final_output` then
holds the output tail. Use it as a context manager.

Fault tests: `kill()` ends the process with SIGKILL (a crash: no drain), and `start(port=svc.port)`
brings it back on the same port, so clients holding its address reconnect to the new process.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
_SERVING = health_pb2.HealthCheckResponse.SERVING
# Stopped when the test interpreter exits, whatever happened to the test that started them.
# (Not PR_SET_PDEATHSIG: preexec_fn is unsafe in a process that runs gRPC threads.)
_RUNNING: set[ServiceProcess] = set()


@atexit.register
def _stop_leftovers() -> None:
    for service in list(_RUNNING):
        service.stop()


class ServiceStartError(RuntimeError):
    """The service exited or never became SERVING; the message carries its output tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just considered free (racy by nature: `start` retries if the bind fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServiceProcess:
    def __init__(
        self,
        module: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        health_service: str = "",
        start_timeout_s: float = 120.0,
        stop_timeout_s: float = 15.0,
    ):
        self.module = module
        self.args = list(args)
        self.env = dict(env or {})
        self.host = host
        self.health_service = health_service
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.final_output = ""  # output tail of the last stopped process
        self._output_file: tempfile._TemporaryFileWrapper[bytes] | None = None

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.module} is not started")
        return f"{self.host}:{self.port}"

    def channel(self, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=list(options))

    def start(self, attempts: int = 3, *, port: int | None = None) -> ServiceProcess:
        """Spawn and wait until SERVING; on a free port, or on exactly `port` (a restart)."""
        for attempt in range(attempts):
            self._spawn(port or free_port(self.host))
            try:
                self._wait_serving()
                return self
            except ServiceStartError as exc:
                exited = self.proc is not None and self.proc.poll() is not None
                self.stop()
                # A port taken between free_port() and the child's bind shows up as an early exit.
                # A fixed port is not swapped for another: the caller's clients know only that one.
                if port or not exited or attempt == attempts - 1 or "bind" not in str(exc):
                    raise
        raise AssertionError("unreachable")

    def kill(self) -> int | None:
        """SIGKILL at once, like a crash or an OOM kill: nothing is drained. Returns the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        return self.stop()

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit code (None if it was never started)."""
        proc, self.proc = self.proc, None
        _RUNNING.discard(self)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._output_file is not None:
            self.final_output = self.output_tail()  # kept for assertions on shutdown logs
            self._output_file.close()
            self._output_file = None
        return proc.returncode

    def output_tail(self, max_bytes: int = 8000) -> str:
        if self._output_file is None:
            return ""
        self._output_file.flush()
        with open(self._output_file.name, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace")

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, port: int) -> None:
        self.port = port
        # A file, not a pipe: a chatty child can never block on a full pipe nobody reads. It lives as
        # long as the process, so no `with`; stop() closes (and deletes) it.
        self._output_file = tempfile.NamedTemporaryFile(prefix=f"{self.module}-", suffix=".log")  # noqa: SIM115
        # Metrics and the gateway's HTTP API off unless a test asks: parallel test processes must not
        # race for 9101-9103 and 8000.
        metrics_off = {f"IVL_{svc}_METRICS_PORT": "0" for svc in ("ENCODER", "DECODER", "GATEWAY")}
        env = {**os.environ, **metrics_off, "IVL_GATEWAY_HTTP_PORT": "0", "PYTHONUNBUFFERED": "1", **self.env}
        args = [*self.args, "--port", str(port)]
        if self.host != "127.0.0.1":
            args += ["--host", self.host]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._output_file,
            stderr=subprocess.STDOUT,
        )
        _RUNNING.add(self)

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last = "no answer yet"
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise ServiceStartError(
                        f"{self.module} exited with code {self.proc.returncode} before serving; "
                        f"output tail:\n{self.output_tail()}"
                    )
                try:
                    request = health_pb2.HealthCheckRequest(service=self.health_service)
                    reply = stub.Check(request, timeout=1.0)
                    if reply.status == _SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}"
                time.sleep(0.1)
        raise ServiceStartError(
            f"{self.module} not SERVING on {self.address} after {self.start_timeout_s:.0f}s "
            f"(last health: {last}); output tail:\n{self.output_tail()}"
        )
