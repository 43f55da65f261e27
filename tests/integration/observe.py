"""What integration tests read from the running services: Prometheus metrics and JSON log lines.

`start_observed` runs a service (tests/integration/procs.py) with a metrics port of its own and
JSON logs, so tests can scrape it and search its logs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.procs import ServiceProcess, free_port

# Generation that outlasts a deadline or a SIGTERM on a model that otherwise answers at once: a
# decoder with a 2-token step budget spends seconds on the chunked prefill of a ~7000-token prompt.
SLOW_DECODER_ARGS = ("--max-num-seqs", "2", "--max-num-batched-tokens", "2")
LONG_TEXT_TARGET_TOKENS = 6900  # the decoder's default context is 8192


class LongText(NamedTuple):
    text: str
    tokens: int  # of the text alone, in the kit's tokenizer (the prompt around it adds more)


@functools.cache
def long_text() -> LongText:
    """A text of about LONG_TEXT_TARGET_TOKENS tokens in the kit's own tokenizer, whatever its vocabulary.

    Built on first use, inside a test: a kit whose tokenizer cannot load fails that test, not collection.
    """
    from services.language_decoder.tokenizer import InternLM2Tokenizer
    from tests.conftest import load_kit

    tokenizer = InternLM2Tokenizer.from_dir(load_kit().root)
    unit, sample = "hello world story", 100
    per_unit = len(tokenizer.encode(" ".join([unit] * sample), add_bos=False)) / sample
    text = " ".join([unit] * int(LONG_TEXT_TARGET_TOKENS / per_unit))
    return LongText(text, len(tokenizer.encode(text, add_bos=False)))


# Sample names a family exposes besides its own name (a counter `x` exposes `x_total`, a histogram `x_count`, ...).
_SAMPLE_SUFFIXES = ("_total", "_created", "_count", "_sum", "_bucket", "_info")


class MetricMissing(AssertionError):
    """The scrape has no such metric: a renamed or removed metric must fail a test, not read as 0."""


class Metrics:
    """One scrape of a /metrics endpoint."""

    def __init__(self, text: str):
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.families: set[str] = set()  # every family the service exposes, sampled yet or not
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def exposes(self, name: str) -> bool:
        return name in self.families or any(
            name.endswith(suffix) and name[: -len(suffix)] in self.families for suffix in _SAMPLE_SUFFIXES)

    def get(self, name: str, **labels: str) -> float:
        """The sample's value. A labelled sample not seen yet is 0 (a counter whose labels nothing has
        touched), but only for a metric the service exposes: an unknown name raises MetricMissing."""
        value = self.samples.get((name, frozenset(labels.items())))
        if value is not None:
            return value
        if labels and self.exposes(name):
            return 0.0
        prefix = "_".join(name.split("_")[:2])
        known = sorted(f for f in self.families if f.startswith(prefix))
        raise MetricMissing(f"no metric {name}{labels or ''} in the scrape; its {prefix}* metrics: {', '.join(known)}")

    def rpc(self, service: str, method: str, code: str) -> float:
        return self.get("ivl_grpc_requests_total", grpc_service=service, grpc_method=method, grpc_code=code)


def scrape(port: int) -> Metrics:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return Metrics(reply.read().decode())


def wait_for_metrics(port: int, ok: Callable[[Metrics], bool], timeout_s: float = 15.0) -> Metrics:
    """Scrape until `ok(metrics)`; the last scrape either way (assert on it for the message)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = scrape(port)
        if ok(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def json_logs(output: str) -> list[dict]:
    """The JSON log lines of a process's output (other output, e.g. progress bars, is skipped)."""
    entries = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                entries.append(json.loads(line))
    return entries


@dataclass
class Observed:
    process: ServiceProcess
    metrics_port: int

    def metrics(self) -> Metrics:
        return scrape(self.metrics_port)

    def logs(self) -> str:
        """Everything the process wrote so far."""
        return self.process.output_tail(max_bytes=1 << 26)


def start_observed(module: str, args: Sequence[str], *, log_level: str = "DEBUG",
                   process: Callable[[str, list[str]], ServiceProcess] = ServiceProcess) -> Observed:
    """`process` builds the ServiceProcess (e.g. one that health-checks over TLS)."""
    port = free_port()
    proc = process(module, [*args, "--metrics-port", str(port), "--log-format", "json", "--log-level", log_level])
    return Observed(proc.start(), port)
