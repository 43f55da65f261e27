"""`internvl-chat`, the installed entry point, run as a subprocess the way a person runs it.

Every mistake a user can make (a missing or unreadable file, an image or video that does not decode,
too many tiles, a prompt beyond the context, bad sampling values, a model directory that is not a
checkpoint, bad arguments) ends with one line `internvl-chat: ...` on stderr and exit 2; a failure
while running exits 1; Ctrl-C during generation exits 130; `-v` keeps the traceback. The model is the
dev kit's tiny checkpoint; the broken checkpoints are copies of it (symlinks) with one thing wrong.
The rules of the argument checks are also tested in-process (fast), against `argument_problem`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.chat import CONTEXT_TOKENS, MAX_FRAMES, argument_problem, build_parser
from services.common.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from services.common.limits import MAX_TILES_LIMIT
from tests.conftest import load_kit
from tests.integration.procs import REPO_ROOT

KIT = load_kit()
IMAGES = {image_id: str(KIT.path(img["file"])) for image_id, img in KIT.images.items()}
VIDEO = str(KIT.path(KIT.manifest["video"]["file"]))
# The console script pip installed next to this interpreter (`pip install -e .`, run by `make setup`).
CHAT = Path(sys.executable).parent / "internvl-chat"
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}
# Runs the entry point with SIGINT at its default, whatever this test process inherited: a shell
# starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored.
WITH_DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                       "os.execv(sys.argv[1], sys.argv[1:])")
LOAD_TIMEOUT_S = 240.0  # a loaded 2-core machine takes a while to import torch and load the model


def chat(*args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    assert CHAT.is_file(), f"{CHAT} is not installed; run `make setup` (pip install -e .)"
    return subprocess.run([str(CHAT), *args], cwd=REPO_ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, encoding="utf-8", timeout=LOAD_TIMEOUT_S)


def with_model(*args: str, model: Path | str = KIT.root) -> tuple[str, ...]:
    return ("--model", str(model), *args)


def one_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a failed run, after checking the exit status and that stdout is empty."""
    assert done.returncode == code, f"exit {done.returncode}, wanted {code}; stderr:\n{done.stderr}"
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("internvl-chat: "), f"not one line:\n{done.stderr}"
    return lines[0]


def argparse_error(done: subprocess.CompletedProcess[str]) -> str:
    """argparse's own format (usage, then `prog: error: ...`), exit 2, no traceback."""
    assert done.returncode == EXIT_USAGE, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.startswith("usage: internvl-chat ")
    last = done.stderr.splitlines()[-1]
    assert last.startswith("internvl-chat: error: ")
    return last.removeprefix("internvl-chat: error: ")


# ---------------------------------------------------------------------------------- inputs and files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    png = Path(IMAGES["img0"]).read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 3])
    (d / "notes.png").write_text("not an image\n")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.mp4").write_text("not a video\n")
    (d / "a-directory").mkdir()
    return {p.name: str(p) for p in d.iterdir()} | {"missing.png": str(d / "missing.png")}


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing image", r"cannot read image \S+/missing\.png: No such file or directory"),
        ("unreadable image", r"cannot read image \S+/a-directory: Is a directory"),
        ("truncated image", r"cannot decode image \S+/truncated\.png: image file is truncated.*; the file is damaged"),
        ("not an image", r"image \S+/notes\.png is not a PNG, JPEG, WebP, GIF, BMP or TIFF image, or its header "
                         r"is damaged"),
        ("empty image", r"image \S+/empty\.png is empty; give a PNG, JPEG, WebP, GIF, BMP or TIFF file"),
        ("not a video", r"video \S+/notes\.mp4: cannot decode video: .*; give an MP4/H\.264 or another format "
                        r"ffmpeg reads"),
    ],
)
def test_a_bad_input_file_is_one_line_and_exit_2(files: dict[str, str], case: str, pattern: str):
    flag, name = {
        "missing image": ("--image", "missing.png"), "unreadable image": ("--image", "a-directory"),
        "truncated image": ("--image", "truncated.png"), "not an image": ("--image", "notes.png"),
        "empty image": ("--image", "empty.png"), "not a video": ("--video", "notes.mp4"),
    }[case]
    line = one_line(chat(*with_model(flag, files[name], "Describe it.")), EXIT_USAGE)
    assert re.fullmatch(f"internvl-chat: {pattern}", line), line


def test_too_many_tiles_for_the_context_are_refused_before_the_weights_load(checkpoints: dict[str, Path]):
    # Three 800x600 images at the default 12 tiles (+ thumbnail) are 39 tiles of 256 tokens: over 8192.
    # The weights of this checkpoint do not read, so an answer about the prompt proves they were not loaded.
    images = [arg for _ in range(3) for arg in ("--image", IMAGES["img0"])]
    line = one_line(chat(*with_model(*images, "Compare them.", model=checkpoints["truncated weights"])), EXIT_USAGE)
    assert re.fullmatch(rf"internvl-chat: the prompt is \d+ tokens \(39 image tiles of 256 tokens each\); the "
                        rf"context holds {CONTEXT_TOKENS} \(prompt \+ answer\): use fewer images, a lower "
                        r"--max-tiles, fewer --frames or a shorter question", line), line


def test_a_question_beyond_the_context_is_refused():
    line = one_line(chat(*with_model("word " * CONTEXT_TOKENS)), EXIT_USAGE)
    assert f"the context holds {CONTEXT_TOKENS}" in line


def test_placeholders_that_do_not_match_the_images_are_refused():
    line = one_line(chat(*with_model("--image", IMAGES["img0"], "<image> and <image>: compare")), EXIT_USAGE)
    assert "prompt has 2 <image> placeholder(s) but 1 image(s)" in line
    assert line.endswith("write one <image> per image in the question, or none")


def test_verbose_keeps_the_traceback(files: dict[str, str]):
    done = chat(*with_model("--image", files["truncated.png"], "-v", "Describe it."))
    assert done.returncode == EXIT_USAGE
    assert done.stderr.startswith("Traceback (most recent call last):"), done.stderr
    assert "UnidentifiedImageError" not in done.stderr and "OSError: image file is truncated" in done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"internvl-chat: cannot decode image {files['truncated.png']}")


# ---------------------------------------------------------------------------------- the checkpoint


CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def broken_copy(root: Path, name: str) -> Path:
    """The kit's checkpoint as symlinks, each file but the one this case breaks."""
    out = root / name.replace(" ", "-")
    out.mkdir()
    for file in CHECKPOINT_FILES:
        (out / file).symlink_to(KIT.path(file))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    made = {name: broken_copy(root, name) for name in
            ("no config", "no weights", "config not JSON", "config of another model", "no tokenizer",
             "truncated weights", "weights of another size")}
    (made["no config"] / "config.json").unlink()
    (made["no weights"] / "model.safetensors").unlink()
    (made["no tokenizer"] / "tokenizer.model").unlink()
    for name, text in (("config not JSON", '{"llm_config": '), ("config of another model", '{"model_type": "bert"}')):
        (made[name] / "config.json").unlink()
        (made[name] / "config.json").write_text(text)
    weights = KIT.path("model.safetensors").read_bytes()
    (made["truncated weights"] / "model.safetensors").unlink()
    (made["truncated weights"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    config = json.loads(KIT.path("config.json").read_text())
    config["llm_config"]["intermediate_size"] += 32  # the weights no longer fit the model it describes
    (made["weights of another size"] / "config.json").unlink()
    (made["weights of another size"] / "config.json").write_text(json.dumps(config))
    made["no such directory"] = root / "no-such-model"
    return made


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("no such directory", r"model '\S+/no-such-model' is neither a checkpoint directory nor a Hub repo id"),
        ("no config", r"\S+ has no config\.json; is it an InternVL2 checkpoint directory\?"),
        ("config not JSON", r"\S+/config\.json is not an InternVL2 config \(JSONDecodeError: .*\); give --model an "
                            r"InternVL2 checkpoint directory"),
        ("config of another model", r"\S+/config\.json is not an InternVL2 config \(KeyError: 'vision_config'\); "
                                    r"give --model an InternVL2 checkpoint directory"),
        ("no tokenizer", r"cannot load the tokenizer of \S+ \(\S+ has no tokenizer\.model\); the checkpoint needs "
                         r"its tokenizer files \(tokenizer_config\.json and the files it names\)"),
        ("no weights", r"\S+ has neither model\.safetensors nor model\.safetensors\.index\.json; --model must be a "
                       r"complete, unmodified InternVL2 checkpoint"),
        ("truncated weights", r"the weights in \S+ do not read \(.*\); the download is incomplete or the files are "
                              r"corrupt: fetch them again"),
        ("weights of another size", r"language model: \S+ has shape \(\d+, \d+\) in the checkpoint, the model "
                                    r"expects \(\d+, \d+\); --model must be a complete, unmodified InternVL2 "
                                    r"checkpoint"),
    ],
)
def test_a_model_that_is_not_a_checkpoint_is_one_line_and_exit_2(checkpoints: dict[str, Path], case: str,
                                                                   pattern: str):
    line = one_line(chat(*with_model("--max-new-tokens", "2", "hi", model=checkpoints[case])), EXIT_USAGE)
    assert re.fullmatch(f"internvl-chat: {pattern}", line), line


# ---------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--max-tiles", str(MAX_TILES_LIMIT + 1)), f"--max-tiles must be in [1, {MAX_TILES_LIMIT}], got 41"),
        (("--temperature", "-1"), "bad sampling settings: temperature must be >= 0 (0 = greedy), got -1.0"),
        (("--image", "a.png", "--video", "b.mp4"), "give --image or --video, not both"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(args: tuple[str, ...], message: str):
    assert argparse_error(chat(*with_model(*args, "hi"))) == message


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--image", "a.png", "--video", "b.mp4"), "give --image or --video, not both"),
        (("--image", "a.png", "--combine"), "--combine needs at least two --image"),
        (("--frames", "4"), "--frames needs --video"),
        (("--video", "b.mp4", "--frames", "0"), f"--frames must be in [1, {MAX_FRAMES}], got 0"),
        (("--video", "b.mp4", "--frames", str(MAX_FRAMES + 1)), f"--frames must be in [1, {MAX_FRAMES}], got 65"),
        (("--max-tiles", "0"), f"--max-tiles must be in [1, {MAX_TILES_LIMIT}], got 0"),
        (("--max-new-tokens", "0"), f"--max-new-tokens must be in [1, {CONTEXT_TOKENS}] (prompt and answer share "
                                    f"{CONTEXT_TOKENS} tokens), got 0"),
        (("--max-new-tokens", str(CONTEXT_TOKENS + 1)), f"--max-new-tokens must be in [1, {CONTEXT_TOKENS}]"),
        (("--top-p", "1.5"), "bad sampling settings: top_p must be in (0, 1], got 1.5"),
        (("--top-p", "0"), "bad sampling settings: top_p must be in (0, 1], got 0.0"),
        (("--top-k", "-1"), "bad sampling settings: top_k must be >= 0 (0 = off), got -1"),
        (("--repetition-penalty", "0"), "bad sampling settings: repetition_penalty must be > 0 (1 = off), got 0.0"),
        (("--dtype", "int8"), "--dtype: unknown dtype 'int8'; use one of auto"),
        (("--device", "gpu0"), "--device 'gpu0' is not a device; use cpu, cuda or cuda:N"),
        (("--device", "cuda:99"), "--device cuda:99: "),
    ],
)
def test_argument_rules(args: tuple[str, ...], problem: str):
    parsed = build_parser().parse_args(["--model", "m", *args, "hi"])
    assert (argument_problem(parsed) or "").startswith(problem)


@pytest.mark.parametrize("args", [(), ("--sample", "--temperature", "0", "--top-p", "0.9", "--top-k", "5",
                                       "--repetition-penalty", "1.1", "--seed", "3"),
                                  ("--image", "a.png", "--image", "b.png", "--combine", "--max-tiles", "40"),
                                  ("--video", "v.mp4", "--frames", str(MAX_FRAMES)), ("--device", "cpu")])
def test_good_arguments_pass(args: tuple[str, ...]):
    assert argument_problem(build_parser().parse_args(["--model", "m", *args, "hi"])) is None


# ---------------------------------------------------------------------------------- running


def test_an_answer_upstream_gave_is_printed_and_nothing_else():
    """Two separate images (Image-1/Image-2 labels added by the CLI): the kit's golden answer."""
    case = KIT.chat_cases["multi_image_separate_round1"]
    done = chat(*with_model("--image", IMAGES["img3"], "--image", IMAGES["img2"], "--max-new-tokens",
                            str(case["inputs"]["generation_config"]["max_new_tokens"]),
                            "Describe the two images in detail."))
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout == case["expected"]["responses"][0] + "\n"
    assert done.stderr == ""


def test_an_answer_that_cannot_be_written_is_a_runtime_failure_exit_1():
    with open("/dev/full", "w") as full:
        done = chat(*with_model("--max-new-tokens", "2", "hi"), stdout=full)
    assert done.returncode == EXIT_FAILURE, done.stderr
    assert done.stderr == "internvl-chat: cannot write the answer to stdout: No space left on device\n"


def test_ctrl_c_during_generation_exits_130(tmp_path: Path):
    # A repetition penalty below 1 makes the random-weight model repeat itself instead of stopping,
    # so generation runs for minutes unless interrupted.
    argv = [str(CHAT), *with_model("-v", "--repetition-penalty", "0.01", "--max-new-tokens", "4000",
                                   "Count to ten.")]
    assert CHAT.is_file(), f"{CHAT} is not installed; run `make setup` (pip install -e .)"
    err_path, out_path = tmp_path / "stderr", tmp_path / "stdout"
    with err_path.open("wb") as err, out_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", WITH_DEFAULT_SIGINT, *argv], cwd=REPO_ROOT, env=ENV,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while "generating at most" not in err_path.read_text(errors="replace"):
            assert proc.poll() is None, f"exited {proc.returncode} before generating:\n{err_path.read_text()}"
            assert time.monotonic() < deadline, f"never started generating:\n{err_path.read_text()}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == EXIT_INTERRUPTED, err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err_path.read_text(encoding="utf-8")
    assert stderr.splitlines()[-1] == "internvl-chat: interrupted"
    assert "KeyboardInterrupt" in stderr and "services/inprocess.py" in stderr  # -v: interrupted in chat()
    assert out_path.read_bytes() == b""


@pytest.mark.parametrize("value", ["nan", "inf", "warm"])
def test_sampling_values_must_be_finite_numbers(value: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--model", "m", "--temperature", value, "hi"])
    assert exit_info.value.code == EXIT_USAGE
    assert "argument --temperature: " in capsys.readouterr().err
