"""EngineHealth's pure parts: counting, transitions, the watcher's states, probes and exit, the switch."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from services.common import engine_health
from services.common.engine_health import (
    EngineDead,
    EngineHealth,
    EngineHealthCollector,
    EngineHealthConfig,
    FaultSwitch,
    InjectedFault,
)


def test_k_consecutive_failures_turn_it_unhealthy_and_one_success_back():
    health = EngineHealth(EngineHealthConfig(max_failures=3), "step")
    for _ in range(2):
        health.record(False)
    health.record(True)  # not consecutive: the count starts again
    health.record(False)
    health.record(False)
    assert health.healthy and health.consecutive_failures == 2
    health.record(False)
    assert not health.healthy and health.unhealthy_total == 1
    health.record(False)
    assert health.unhealthy_total == 1, "one episode, however many failures"
    health.record(True)
    assert health.healthy and health.recoveries_total == 1 and health.failures_total == 6


def test_settings_are_checked():
    with pytest.raises(ValueError, match="--engine-max-failures"):
        EngineHealthConfig(max_failures=0)
    with pytest.raises(ValueError, match="--engine-recovery-timeout"):
        EngineHealthConfig(recovery_timeout_s=0)


def test_watch_publishes_states_and_probes_until_recovered(monkeypatch):
    monkeypatch.setattr(engine_health, "PROBE_INTERVAL_S", 0.01)
    health = EngineHealth(EngineHealthConfig(max_failures=1, recovery_timeout_s=30), "step")
    states: list[bool] = []
    probes = 0

    async def set_serving(flag: bool) -> None:
        states.append(flag)

    async def probe() -> None:  # fails twice, then the engine works again
        nonlocal probes
        probes += 1
        health.record(probes > 2)

    async def scenario() -> None:
        watcher = asyncio.ensure_future(health.watch(set_serving, probe))
        await asyncio.sleep(0)
        # From the engine's thread, as the decoder reports.
        worker = threading.Thread(target=health.record, args=(False,))
        worker.start()
        worker.join()
        async with asyncio.timeout(10):
            while states != [False, True]:
                await asyncio.sleep(0.005)
        watcher.cancel()

    asyncio.run(scenario())
    assert probes == 3 and health.healthy and health.recoveries_total == 1


def test_watch_raises_engine_dead_past_the_recovery_timeout(monkeypatch):
    monkeypatch.setattr(engine_health, "PROBE_INTERVAL_S", 0.01)
    health = EngineHealth(EngineHealthConfig(max_failures=1, recovery_timeout_s=0.2), "step")

    async def set_serving(flag: bool) -> None:
        assert flag is False

    async def probe() -> None:
        health.record(False)

    async def scenario() -> None:
        health.record(False)
        async with asyncio.timeout(10):
            await health.watch(set_serving, probe)

    with pytest.raises(EngineDead, match="kept failing"):
        asyncio.run(scenario())


def test_collector_reports_state():
    health = EngineHealth(EngineHealthConfig(max_failures=1), "step")
    health.record(False)
    samples = {m.name: m.samples[0].value for m in EngineHealthCollector(lambda: health).collect()}
    assert samples["ivl_engine_healthy"] == 0 and samples["ivl_engine_unhealthy"] == 1
    assert list(EngineHealthCollector(lambda: None).collect()) == []


def test_fault_switch_is_off_unless_set(tmp_path: Path):
    def call() -> str:
        return "ok"

    assert FaultSwitch("").wrap(call) is call
    path = tmp_path / "fault"
    faulty = FaultSwitch(str(path)).wrap(call)
    assert faulty() == "ok"
    path.touch()
    with pytest.raises(InjectedFault):
        faulty()
    path.unlink()
    assert faulty() == "ok"
