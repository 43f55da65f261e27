"""Health that sees a dead engine: a model service whose every model call fails stops saying SERVING.

A persistent device fault (a CUDA error that poisons the context, a GPU fallen off the bus) leaves the
process up and its gRPC health SERVING while every engine step (decoder) or forward batch (encoder)
fails, so round robin keeps sending it traffic. The services report each step's outcome here:

- after `max_failures` failures in a row the service turns NOT_SERVING (readiness fails, the pod
  leaves its headless Service's DNS answers, the gateways stop calling it);
- while unhealthy it probes its own engine every PROBE_INTERVAL_S with a throwaway call (no client
  traffic reaches it any more, so only a probe can show a recovery); the first successful step turns
  it SERVING again, logged and counted (`ivl_engine_recoveries_total`);
- still failing `recovery_timeout_s` after it turned unhealthy, the process exits with EXIT_CODE so
  the orchestrator replaces it (a draining process is left alone: it is on its way out already).

`fault_file` is a test-only switch (off unless set): while that file exists every model call raises
`InjectedFault`. Tests create and delete the file to break and mend a real process's engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Exit status of a process whose engine did not recover (distinct from 1, a crash, and 2, a bad
# configuration): `kubectl describe pod` shows it as the last state's exit code.
EXIT_CODE = 3
# How often an unhealthy service runs a throwaway call through its engine to see whether it is back.
PROBE_INTERVAL_S = 2.0


class InjectedFault(RuntimeError):
    """Raised by every model call while the test fault file exists."""


class EngineDead(RuntimeError):
    """The engine kept failing past the recovery timeout: the process must be replaced."""


@dataclass(frozen=True)
class EngineHealthConfig:
    max_failures: int = 3  # consecutive failed steps/batches before NOT_SERVING
    recovery_timeout_s: float = 120.0  # unhealthy this long -> exit EXIT_CODE
    fault_file: str = ""  # test-only: every model call fails while this file exists ("" = off)

    def __post_init__(self) -> None:
        problems = engine_health_problems(self.max_failures, self.recovery_timeout_s)
        if problems:
            raise ValueError("; ".join(problems))


def engine_health_problems(max_failures: int, recovery_timeout_s: float) -> list[str]:
    """What is wrong with the settings `add_engine_health_flags` reads (empty when nothing)."""
    problems = []
    if max_failures < 1:
        problems.append("--engine-max-failures must be >= 1")
    if recovery_timeout_s <= 0:
        problems.append("--engine-recovery-timeout must be > 0 seconds")
    return problems


def add_engine_health_flags(flags: Any) -> None:
    """The model services' flags for this module (an `EnvFlags`; dataclass fields of the same names)."""
    flags.add("--engine-max-failures", int, "consecutive failed engine steps/batches before health says NOT_SERVING")
    flags.add("--engine-recovery-timeout", float,
              f"seconds an unhealthy engine has to recover before the process exits with status {EXIT_CODE}")
    # Hidden from --help: a test hook, never a production setting.
    flags.parser.add_argument("--test-fault-file", default=flags.env.get(flags.env_name("--test-fault-file"), ""),
                              help=argparse.SUPPRESS)


class FaultSwitch:
    """The test-only fault: `check()` raises while the file exists; a no-op when `path` is empty."""

    def __init__(self, path: str):
        self.path = path

    def check(self) -> None:
        if self.path and os.path.exists(self.path):
            raise InjectedFault(f"injected fault: the test fault file {self.path} exists")

    def wrap(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """`call` failing while the switch is on (the function itself when the switch is off)."""
        if not self.path:
            return call

        def faulty(*args: Any, **kwargs: Any) -> Any:
            self.check()
            return call(*args, **kwargs)

        return faulty

    def install_on_module(self, module: Any) -> None:
        """Fail every call of a torch module (a forward pre-hook; eager calls only: a CUDA graph
        replay runs no Python hooks)."""
        if self.path:
            module.register_forward_pre_hook(lambda _module, _inputs: self.check())


class EngineHealth:
    """Consecutive-failure count, healthy flag and counters of one engine; thread-safe.

    `record(ok)` is called by the engine after every step (from any thread); `watch()` runs on the
    server's event loop, turns transitions into health states, probes while unhealthy and raises
    EngineDead past the recovery timeout.
    """

    def __init__(self, config: EngineHealthConfig, what: str):
        self.config = config
        self.what = what  # "decoder engine step", "encoder batch": for log lines
        self.fault = FaultSwitch(config.fault_file)
        self._lock = threading.Lock()
        self._consecutive_failures = 0
        self._healthy = True
        self._unhealthy_since = 0.0
        self.failures_total = 0
        self.unhealthy_total = 0  # times it turned NOT_SERVING
        self.recoveries_total = 0  # times it turned SERVING again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    def record(self, ok: bool) -> None:
        """One engine step or batch finished: `ok` unless its model call failed."""
        with self._lock:
            if ok:
                self._consecutive_failures = 0
                changed = not self._healthy
                if changed:
                    self._healthy = True
                    self.recoveries_total += 1
                    log.warning("%s succeeded again after %.1fs unhealthy: engine recovered, back to SERVING",
                                self.what, time.monotonic() - self._unhealthy_since)
            else:
                self.failures_total += 1
                self._consecutive_failures += 1
                changed = self._healthy and self._consecutive_failures >= self.config.max_failures
                if changed:
                    self._healthy = False
                    self._unhealthy_since = time.monotonic()
                    self.unhealthy_total += 1
                    log.error("%d consecutive %s failures: engine unhealthy, health NOT_SERVING; the process exits "
                              "with status %d unless it recovers within %.0fs", self._consecutive_failures, self.what,
                              EXIT_CODE, self.config.recovery_timeout_s)
            loop, event = self._loop, self._changed
        if changed and loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting anyway
                loop.call_soon_threadsafe(event.set)

    async def watch(self, set_serving: Callable[[bool], Awaitable[None]],
                    probe: Callable[[], Awaitable[object]]) -> None:
        """Keep the health state in step with the engine until cancelled; EngineDead past the timeout.

        `set_serving(flag)` publishes a state (the server ignores SERVING once it drains); `probe()`
        runs one throwaway call through the engine, whose outcome the engine reports to `record`.
        """
        self._loop, self._changed = asyncio.get_running_loop(), asyncio.Event()
        try:
            while True:
                self._changed.clear()
                if self._healthy:
                    await self._changed.wait()
                    continue
                await set_serving(False)
                deadline = self._unhealthy_since + self.config.recovery_timeout_s
                while not self._healthy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise EngineDead(f"{self.what} kept failing for {self.config.recovery_timeout_s:.0f}s "
                                         f"({self._consecutive_failures} failures in a row): exiting so that the "
                                         "orchestrator replaces this process")
                    try:  # the engine records the probe's step itself; a failure only means "not yet"
                        await asyncio.wait_for(probe(), left)
                    except Exception as exc:  # noqa: BLE001
                        log.debug("engine probe failed: %s", exc)
                    if not self._healthy:  # next probe after the interval, or at once on a recovery
                        self._changed.clear()
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), PROBE_INTERVAL_S)
                await set_serving(True)
        finally:
            self._loop = self._changed = None


class EngineHealthCollector(Collector):
    """Prometheus view of an `EngineHealth` (or of nothing before the model is loaded)."""

    def __init__(self, get: Callable[[], EngineHealth | None]):
        self._get = get

    def collect(self) -> Iterator[Metric]:
        health = self._get()
        if health is None:
            return
        yield GaugeMetricFamily("ivl_engine_healthy", "1 while the engine's steps succeed, 0 once "
                                "--engine-max-failures in a row failed", value=int(health.healthy))
        yield GaugeMetricFamily("ivl_engine_consecutive_failures", "Engine steps/batches failed in a row",
                                value=health.consecutive_failures)
        yield CounterMetricFamily("ivl_engine_failures", "Engine steps/batches whose model call failed",
                                  value=health.failures_total)
        yield CounterMetricFamily("ivl_engine_unhealthy", "Times the engine turned unhealthy (NOT_SERVING)",
                                  value=health.unhealthy_total)
        yield CounterMetricFamily("ivl_engine_recoveries", "Times an unhealthy engine recovered (SERVING again)",
                                  value=health.recoveries_total)
