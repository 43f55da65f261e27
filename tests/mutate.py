"""`make mutate`: mutation testing (mutmut) of the core pure modules, one group of modules at a time.

Each group pairs the modules it mutates with the fast unit tests that exercise them, so a run takes
minutes, not the hours of the whole suite per mutant. Every group runs in its own folder under
.cache/mutate/GROUP (links to the sources and tests, a pyproject.toml holding this group's
[tool.mutmut]), so each keeps its own mutants/ and a rerun retests only what changed. Within a group
mutmut first maps which of the tests reach each function, then runs only those for a mutant of it.

    python -m tests.mutate                      # every group
    python -m tests.mutate sampler security     # some groups
    python -m tests.mutate --list               # the groups, their modules and tests

It prints, per group, the mutants killed, survived, not reached by the selected tests, and timed
out, and lists the survivors (`cd .cache/mutate/GROUP && mutmut show NAME` shows one's diff).
docs/testing.md records the last report and why each kept survivor is kept. Not in CI: too slow.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "mutate"
LINKED = ("services", "gateway", "internvl", "tests")  # what a group's folder sees of the repository


@dataclass(frozen=True)
class Group:
    modules: tuple[str, ...]  # files mutated
    tests: tuple[str, ...]  # pytest paths or node ids run against the mutants


GROUPS = {
    # Tiling plus the rest of preprocessing (image opening, video frame sampling and its size checks),
    # and the torch-free tile counting and container probe the gateway shares.
    "tiling": Group(
        ("services/vision_encoder/preprocess.py", "services/common/tiling.py", "services/common/video_probe.py"),
        ("tests/unit/test_tiling.py", "tests/unit/test_tile_budget.py", "tests/unit/test_input_limits.py",
         "tests/unit/test_video_frames.py", "tests/unit/test_video_probe.py", "tests/unit/test_pixel_values_rules.py",
         "tests/parity/test_preprocess.py", "tests/unit/test_video_damage.py"),
    ),
    "template": Group(
        ("services/language_decoder/prompt.py",),
        ("tests/unit/test_template.py", "tests/unit/test_template_rules.py", "tests/unit/test_family_templates.py",
         "tests/parity/test_prompts.py"),
    ),
    # The warpers (sampling.py) and the engine's batched sampler; generate()'s loop needs a model per
    # test run (minutes per mutant here): the engine and parity tests cover it.
    "sampler": Group(
        ("services/language_decoder/sampling.py", "services/language_decoder/engine/sampler.py"),
        ("tests/unit/test_sampling_boundaries.py", "tests/unit/test_engine_sampler.py",
         "tests/unit/test_internlm2.py::test_repetition_penalty_hf_rule",
         "tests/unit/test_internlm2.py::test_temperature_and_top_k",
         "tests/unit/test_internlm2.py::test_top_p_keeps_smallest_set_reaching_mass",
         "tests/unit/test_internlm2.py::test_sampling_is_seeded_and_respects_filters"),
    ),
    "block_manager": Group(("services/language_decoder/engine/block_manager.py",),
                           ("tests/unit/test_engine_block_manager.py",)),
    "scheduler": Group(("services/language_decoder/engine/scheduler.py",), ("tests/unit/test_engine_scheduler.py",)),
    "cache_keys": Group(("gateway/feature_cache.py",), ("tests/unit/test_feature_cache_format.py",)),
    "cache_values": Group(("gateway/feature_values.py",),
                          ("tests/unit/test_feature_cache_format.py", "tests/unit/test_feature_values_v2.py",
                           "tests/unit/test_wire_chunks.py")),
    "wire": Group(("services/common/wire.py", "services/common/tensors.py"),
                  ("tests/unit/test_wire.py", "tests/unit/test_wire_chunks.py")),
    "security": Group(("services/common/security.py",), ("tests/unit/test_security.py",)),
}

# mutmut's statuses, grouped for the report.
KILLED = {"killed", "caught by type check"}
REPORTED = ("killed", "survived", "no tests", "timeout", "suspicious", "segfault", "not checked", "skipped")


def group_config(group: Group) -> str:
    """The pyproject.toml of a group's folder: the repository's pytest settings and this group's mutmut."""
    pytest_options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    lines = ["[tool.pytest.ini_options]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in pytest_options.items()]
    lines += [
        "",
        "[tool.mutmut]",
        'source_paths = ["services", "gateway"]',
        'also_copy = ["internvl"]',
        f"only_mutate = {json.dumps(list(group.modules))}",
        f"pytest_add_cli_args_test_selection = {json.dumps(list(group.tests))}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider"]',
        # The tests import torch and grpc, which are not safe to fork once used.
        'process_isolation = "forkserver"',
    ]
    return "\n".join(lines) + "\n"


def prepare(name: str, group: Group) -> Path:
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    for entry in LINKED:
        link = folder / entry
        if not link.is_symlink():
            link.symlink_to(REPO / entry, target_is_directory=True)
    config = folder / "pyproject.toml"
    text = group_config(group)
    if not config.is_file() or config.read_text() != text:
        config.write_text(text)
    return folder


def run_group(name: str, group: Group, jobs: int) -> dict[str, list[str]]:
    """Run mutmut for one group; mutant names by status."""
    folder = prepare(name, group)
    log = WORK / f"{name}.log"
    started = time.monotonic()
    print(f"== {name}: mutating {', '.join(group.modules)} (log: {log.relative_to(REPO)})", flush=True)
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)], cwd=folder,
                              stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"mutmut failed for group {name} (exit {done.returncode}); log tail:\n{tail}")
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=folder,
                             capture_output=True, text=True, check=True).stdout
    by_status: dict[str, list[str]] = collections.defaultdict(list)
    for line in listing.splitlines():
        mutant, sep, status = line.strip().rpartition(": ")
        if sep:
            by_status["killed" if status in KILLED else status].append(mutant)
    print(f"   {summary(by_status)} in {time.monotonic() - started:.0f}s", flush=True)
    for mutant in sorted(by_status.get("survived", [])):
        print(f"   survived: {mutant}")
    return by_status


def summary(by_status: dict[str, list[str]]) -> str:
    counts = {status: len(by_status.get(status, [])) for status in REPORTED}
    counts.update({status: len(names) for status, names in by_status.items() if status not in REPORTED})
    return ", ".join(f"{status} {n}" for status, n in counts.items() if n or status in ("killed", "survived"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutate", description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", metavar="GROUP", help=f"default: all of {', '.join(GROUPS)}")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel (default 2)")
    parser.add_argument("--list", action="store_true", help="print the groups and exit")
    args = parser.parse_args(argv)
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; the groups are {', '.join(GROUPS)}")
    if args.list:
        for name, group in GROUPS.items():
            print(f"{name}: {' '.join(group.modules)}\n    tests: {' '.join(group.tests)}")
        return 0
    results = {name: run_group(name, GROUPS[name], args.jobs) for name in args.groups or GROUPS}
    print("\n== report")
    for name, by_status in results.items():
        print(f"   {name}: {summary(by_status)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
