"""One command runs it all: the launcher (`python -m services.tools.run_local`) and the client CLI
(`python -m gateway.cli`), both as real subprocesses.

The launcher tests check what a person sees: `--demo` prints an answer and exits 0, the foreground
mode serves until SIGTERM and then stops its children gateway first, a launcher killed outright
takes its children with it, and a model that cannot load is reported with its log. In every case no
child process is left behind. The client tests run the kit's cases through the CLI against a stack
started by `tests/integration/stack.py`, so its streamed stdout must be exactly upstream's answer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from internvl.v1 import gateway_pb2
from services.tools.run_local import DEMO_IMAGE, DEMO_QUESTION
from tests.conftest import load_kit
from tests.integration.procs import REPO_ROOT, free_port
from tests.integration.stack import Stack, start_stack

KIT = load_kit()
ENV = {k: v for k, v in os.environ.items() if k not in ("IVL_API_KEY", "IVL_GATEWAY_API_KEYS")}
ENV.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
API_KEY = "test-key-0123456789"
STARTED = re.compile(r"started ([\w-]+) \(pid (\d+)\)")


# ---------------------------------------------------------------------------------------- helpers


def launcher_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.tools.run_local", "--model", str(KIT.root), "--device", "cpu",
            "--dtype", "fp32", "--port", "0", "--http-port", "0", "--no-metrics", "--start-timeout", "120", *args]


def started_pids(stderr: str) -> dict[str, int]:
    pids = {name: int(pid) for name, pid in STARTED.findall(stderr)}
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids: dict[str, int], timeout_s: float = 15.0) -> dict[str, int]:
    """The pids still alive after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    left = dict(pids)
    while left and time.monotonic() < deadline:
        left = {name: pid for name, pid in left.items() if alive(pid)}
        time.sleep(0.05)
    return left


def kill_leftovers(pids: dict[str, int]) -> None:
    for pid in pids.values():
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


class Launcher:
    """The launcher in the background, stderr to a file we poll (no pipe to fill up)."""

    def __init__(self, tmp_path: Path, *args: str):
        self.stdout_path = tmp_path / "launcher.out"
        self.stderr_path = tmp_path / "launcher.err"
        self.run_dir = tmp_path / "run"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(launcher_argv("--run-dir", str(self.run_dir), *args), cwd=REPO_ROOT,
                                         env=ENV, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 150.0) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(pattern, self.stderr)
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"launcher never printed {pattern!r} (exit {self.proc.poll()}):\n{self.stderr}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        kill_leftovers(started_pids(self.stderr))


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[list[Launcher]]:
    made: list[Launcher] = []
    yield made
    for one in made:
        one.close()


def cli(target: str, *args: str, key: str | None = API_KEY,
        timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """The client CLI; `key` goes in IVL_API_KEY (None: no key)."""
    env = ENV if key is None else {**ENV, "IVL_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "--target", target, *args], cwd=REPO_ROOT,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, encoding="utf-8",
                          timeout=timeout_s)


def answer(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"client exited {done.returncode}:\n{done.stderr}"
    assert done.stdout.endswith("\n")
    return done.stdout[:-1]


def expected(case_id: str) -> str:
    return KIT.case(case_id)["expected"]["responses"][0]


def max_new(case_id: str) -> str:
    return str(KIT.case(case_id)["inputs"]["generation_config"]["max_new_tokens"])


def question(case_id: str) -> str:
    return KIT.case(case_id)["inputs"]["question"]


# The placeholders the gateway writes itself in front of a question without any: upstream's video
# prefix ("Frame1: <image>\n..."), its separate-images prefix ("Image-1: <image>\n...") or one "<image>\n".
GATEWAY_PREFIX = re.compile(r"((Frame|Image-)\d+: <image>\n)+|<image>\n")


def bare_question(case_id: str) -> str:
    """The case's question without the upstream prefix, as a user would type it."""
    text = question(case_id)
    prefix = GATEWAY_PREFIX.match(text)
    return text[prefix.end():] if prefix else text


def image_files(case_id: str) -> list[str]:
    """`--image` arguments for a case's images, in the case's order."""
    return [arg for image_id in KIT.case(case_id)["inputs"]["images"]
            for arg in ("--image", str(KIT.image_file(image_id)))]


def any_image() -> str:
    return str(KIT.image_file(KIT.smallest_image()))


# ---------------------------------------------------------------------------------------- launcher


def test_demo_prints_an_answer_and_leaves_nothing_behind(tmp_path: Path):
    run_dir = tmp_path / "run"
    done = subprocess.run(launcher_argv("--demo", "--run-dir", str(run_dir)), cwd=REPO_ROOT, env=ENV,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, encoding="utf-8", timeout=240)
    pids = started_pids(done.stderr)
    try:
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip(), f"no answer on stdout; stderr:\n{done.stderr}"
        assert set(pids) == {"redis-sessions", "redis-features", "encoder", "decoder", "gateway"}
        assert "gateway ready at 127.0.0.1:" in done.stderr
        assert not wait_gone(pids, timeout_s=5), "children outlived the launcher"
        # Two stores, two policies; the session store's append-only file stays for the next run.
        assert {p.name for p in run_dir.iterdir()} == {"redis-sessions.log", "redis-features.log", "encoder.log",
                                                       "decoder.log", "gateway.log", "redis-sessions-data"}
        assert (run_dir / "redis-sessions-data" / "appendonlydir").is_dir()
        assert "share one Redis" not in (run_dir / "gateway.log").read_text()
        assert "serving" in (run_dir / "gateway.log").read_text()
    finally:
        kill_leftovers(pids)


def test_foreground_serves_until_sigterm_then_stops_gateway_first(tmp_path: Path, launcher: list[Launcher]):
    """`--demo --keep-serving` with API keys: the demo sends the first key, the gateway wants one."""
    keys = tmp_path / "keys"
    keys.write_text(f"# the gateway's keys\n{API_KEY}\nsecond-key\n")
    run = Launcher(tmp_path, "--demo", "--keep-serving", "--api-keys-file", str(keys))
    launcher.append(run)
    target = run.wait_for(r"serving on (\S+);").group(1)
    assert "API keys required" in run.stderr and API_KEY not in run.stderr
    demo_answer = run.stdout  # printed before "serving on"
    assert demo_answer.strip()
    pids = started_pids(run.stderr)
    assert set(pids) == {"redis-sessions", "redis-features", "encoder", "decoder", "gateway"}
    assert "-m gateway.cli --target" in run.stderr  # how to ask more

    # Still serving after the demo: the CLI gets the same (greedy) answer as the demo did.
    # The demo's own image and question (the launcher's defaults, whatever the kit).
    assert answer(cli(target, "--max-new-tokens", "128", "--image", str(DEMO_IMAGE), DEMO_QUESTION)) + "\n" \
        == demo_answer
    assert "UNAUTHENTICATED" in cli(target, "hi", key=None).stderr
    # The OpenAI-compatible HTTP API beside it, at the printed base URL, with the same keys.
    base_url = re.search(r"OpenAI-compatible HTTP API at (\S+) ", run.stderr).group(1)
    models = urllib.request.Request(f"{base_url}/models", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(models, timeout=30) as reply:
        assert json.load(reply)["data"][0]["id"] == KIT.root.name

    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=60) == 0, run.stderr
    err = run.stderr
    order = [err.index(f"stopping {what}") for what in ("gateway", "decoder and encoder", "redis")]
    assert order == sorted(order)
    assert "all stopped" in err
    assert not wait_gone(pids, timeout_s=5)
    for name in pids:  # graceful stops, no SIGKILL
        assert f"{name} exited with code 0" in err


def test_children_die_with_a_killed_launcher(tmp_path: Path, launcher: list[Launcher]):
    run = Launcher(tmp_path)
    launcher.append(run)
    run.wait_for(r"started decoder \(pid \d+\)")  # both Redis, encoder and decoder exist (loading)
    pids = started_pids(run.stderr)
    assert set(pids) == {"redis-sessions", "redis-features", "encoder", "decoder"}
    run.proc.kill()  # no chance to clean up: the kernel's parent-death signal must do it
    run.proc.wait()
    assert not wait_gone(pids, timeout_s=30), "children outlived a SIGKILLed launcher"


def test_a_model_that_cannot_load_is_reported_with_its_log(tmp_path: Path):
    done = subprocess.run(
        [*launcher_argv("--run-dir", str(tmp_path / "run")), "--model", str(tmp_path / "no-such-model")],
        cwd=REPO_ROOT, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    pids = started_pids(done.stderr)
    try:
        assert done.returncode == 1
        assert re.search(r"error: (encoder|decoder) stopped before serving: \1 exited with code 2", done.stderr)
        assert "cannot start" in done.stderr  # the log tail of the failing process
        assert "gateway" not in pids
        assert not wait_gone(pids, timeout_s=5)
    finally:
        kill_leftovers(pids)


def test_a_taken_port_is_a_clear_error(tmp_path: Path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        argv = launcher_argv("--run-dir", str(tmp_path / "run"), "--encoder-port", str(port))
        done = subprocess.run(argv, cwd=REPO_ROOT, env=ENV, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120)
    pids = started_pids(done.stderr)
    try:
        assert done.returncode == 1
        assert f"encoder stopped before serving (is port {port} taken? give another port, or 0 for a free one, " \
               "with --encoder-port)" in done.stderr
        assert f"127.0.0.1:{port}" in done.stderr.split("last lines of")[1]  # the encoder's own words
        assert "gateway" not in pids
        assert not wait_gone(pids, timeout_s=5)
    finally:
        kill_leftovers(pids)


def test_tiny_checkpoint_is_written_when_missing(tmp_path: Path):
    from services.tools.run_local import ensure_tiny_checkpoint

    out = tmp_path / "cache" / "tiny-internvl2"
    assert ensure_tiny_checkpoint(out, ENV) == out
    assert (out / "config.json").is_file() and (out / "tokenizer.model").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["tiny-internvl2"]  # no partial directory left
    mtime = (out / "config.json").stat().st_mtime_ns
    ensure_tiny_checkpoint(out, ENV)  # present: not rewritten
    assert (out / "config.json").stat().st_mtime_ns == mtime


def test_launcher_and_client_are_torch_free():
    code = ("import sys, gateway.cli, services.tools.run_local; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or 'model' in m); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=ENV, check=True, timeout=60)


# ---------------------------------------------------------------------------------------- client CLI


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"{API_KEY}\n")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory, key_file: Path) -> Iterator[Stack]:
    """A gateway that requires an API key (the client tests send it in IVL_API_KEY)."""
    s = start_stack(KIT.root, tmp_path_factory.mktemp("stack"), gateway_args=["--api-keys-file", str(key_file)])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def target(stack: Stack) -> str:
    return stack.gateway.address


def get_session(stack: Stack, session_id: str) -> gateway_pb2.Session:
    channel, stub = stack.gateway_stub()
    with channel:
        return stub.GetSession(gateway_pb2.GetSessionRequest(session_id=session_id), timeout=30,
                               metadata=[("authorization", f"Bearer {API_KEY}")])


def test_cli_text_only(target: str):
    done = cli(target, "--max-new-tokens", max_new("text_single_round"), question("text_single_round"))
    assert answer(done) == expected("text_single_round")
    assert "session" not in done.stderr


def test_cli_image(target: str):
    (image_id,) = KIT.case("image_single_round")["inputs"]["images"]
    done = cli(target, "--max-new-tokens", max_new("image_single_round"), "--max-tiles",
               str(KIT.image(image_id)["max_num"]), *image_files("image_single_round"),
               question("image_single_round"), "-v")  # with its own "<image>\n"
    assert answer(done) == expected("image_single_round")
    assert re.search(r"finish: (stop|length); tokens: prompt \d+", done.stderr)


def test_cli_combined_images(target: str):
    done = cli(target, "--max-new-tokens", max_new("multi_image_combined"), "--combine",
               *image_files("multi_image_combined"), bare_question("multi_image_combined"))
    assert answer(done) == expected("multi_image_combined")


def test_cli_video(target: str):
    video = KIT.video
    done = cli(target, "--max-new-tokens", max_new("video_round1"), "--video", str(KIT.path(video["file"])),
               "--frames", str(video["load_video_args"]["num_segments"]), bare_question("video_round1"))
    assert answer(done) == expected("video_round1")


def test_cli_session_flow(target: str, stack: Stack):
    """Separate images in a new session, then a text-only second turn: upstream's two rounds."""
    first = cli(target, "--new-session", "--max-new-tokens", max_new("multi_image_separate_round1"),
                *image_files("multi_image_separate_round1"), bare_question("multi_image_separate_round1"))
    assert answer(first) == expected("multi_image_separate_round1")
    session_id = re.fullmatch(r"session: (\S+)\n", first.stderr).group(1)

    second = cli(target, "--session", session_id, "--max-new-tokens", max_new("multi_image_separate_round2"),
                 question("multi_image_separate_round2"))
    assert answer(second) == expected("multi_image_separate_round2")
    assert second.stderr == f"session: {session_id}\n"

    session = get_session(stack, session_id)
    assert [[t.user, t.assistant] for t in session.turns] == \
        KIT.case("multi_image_separate_round2")["expected"]["history"]


def test_cli_new_session_with_system_message(target: str, stack: Stack):
    done = cli(target, "--new-session", "--system-message", "Be brief.", "--max-new-tokens", "4", "Hi")
    session_id = re.fullmatch(r"session: (\S+)\n", done.stderr).group(1)
    answer(done)
    session = get_session(stack, session_id)
    assert session.system_message == "Be brief."
    assert len(session.turns) == 1


def test_cli_sampling_differs_from_greedy_and_reproduces_with_its_seed(target: str):
    """--sample reaches the server: the same flags without it decode greedily, and only a draw depends on --seed.

    At temperature 2 the tiny model's random logits are nearly flat, so a 12-token draw is (with
    overwhelming odds) neither the greedy answer nor another seed's draw.
    """
    flags = ["--temperature", "2.0", "--top-p", "0.95", "--top-k", "0", "--repetition-penalty", "1.1",
             "--max-new-tokens", "12", "Tell me a story."]
    greedy = answer(cli(target, "--seed", "7", *flags))
    drawn = {seed: answer(cli(target, "--sample", "--seed", seed, *flags)) for seed in ("7", "8")}
    assert drawn["7"] != greedy and drawn["8"] != greedy
    assert drawn["7"] != drawn["8"]
    assert answer(cli(target, "--sample", "--seed", "7", *flags)) == drawn["7"]


def test_cli_unknown_session_exits_non_zero_with_not_found(target: str):
    done = cli(target, "--session", "no-such-session", "hi")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "NOT_FOUND" in done.stderr and "no-such-session" in done.stderr


def test_cli_invalid_request_exits_with_invalid_argument(target: str):
    done = cli(target, "--image", any_image(), "<image> <image> compare")
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "placeholder" in done.stderr


def test_cli_api_key(target: str, key_file: Path, tmp_path: Path):
    missing = cli(target, "hi", key=None)
    assert missing.returncode == 1 and "UNAUTHENTICATED" in missing.stderr and "IVL_API_KEY" in missing.stderr
    wrong = cli(target, "hi", key="not-the-key")
    assert wrong.returncode == 1 and "UNAUTHENTICATED: invalid API key" in wrong.stderr
    assert "not-the-key" not in wrong.stderr
    from_file = cli(target, "--api-key-file", str(key_file), "--max-new-tokens", "2", "hi", key="not-the-key")
    answer(from_file)  # the file wins over the environment
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    assert cli(target, "--api-key-file", str(empty), "hi").returncode == 2


def test_cli_mutual_tls(stack: Stack, tmp_path: Path):
    """--tls-ca verifies the gateway; --tls-cert/--tls-key identify the client to an mTLS gateway."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    port = free_port()
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--port", str(port), "--encoder", stack.encoder.address,
             "--decoder", stack.decoder.address, "--redis-url", stack.redis.url, "--insecure-open",
             "--metrics-port", "0", "--http-port", "0", "--tls-cert", str(pki.server.cert),
             "--tls-key", str(pki.server.key), "--tls-ca", str(pki.ca.cert)],
            cwd=REPO_ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        credentials = grpc.ssl_channel_credentials(pki.ca_bytes, pki.client.key_bytes, pki.client.cert_bytes)
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=60)
        target = f"127.0.0.1:{port}"
        tls = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
        done = cli(target, *tls, "--max-new-tokens", max_new("text_single_round"), question("text_single_round"),
                   key=None)
        assert answer(done) == expected("text_single_round")
        no_cert = cli(target, "--tls-ca", str(pki.ca.cert), "hi", key=None)
        assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr
        plaintext = cli(target, "hi", key=None)
        assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)


def test_cli_unreachable_gateway_is_unavailable():
    done = cli(f"127.0.0.1:{free_port()}", "--timeout", "10", "hi")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr


def test_cli_usage_errors(tmp_path: Path):
    missing = cli("127.0.0.1:1", "--image", str(tmp_path / "missing.png"), "hi")
    assert missing.returncode == 2 and "cannot read image" in missing.stderr
    both = cli("127.0.0.1:1", "--image", any_image(), "--video", any_image(), "hi")
    assert both.returncode == 2 and "not both" in both.stderr
