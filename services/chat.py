"""One-shot chat for people: `internvl-chat --model DIR --image a.jpg "What is in the picture?"`.

Runs both halves in this process (no servers needed). With several --image flags the images are
separate (`Image-1`, `Image-2` as upstream's multi-image example) unless --combine is given.

What a user can get wrong is checked before the weights are loaded (a real model takes minutes):
the arguments, then the files, the checkpoint's config and tokenizer, the images or video, and the
prompt's length. Every failure is one line `internvl-chat: ...` on stderr with the exit status of
`services.common.cli` (2: fix the arguments or input, 1: running failed, 130: Ctrl-C); `-v` adds the
traceback and progress lines.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from safetensors import SafetensorError

from services.common.checkpoint import CheckpointError, parse_dtype, resolve_model_dir
from services.common.cli import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    fail,
    read_file,
    tolerate_unprintable_output,
)
from services.common.limits import MAX_TILES_LIMIT
from services.common.model_config import InternVLConfig
from services.common.quantization import NO_QUANTIZATION, QUANTIZE_CHOICES
from services.inprocess import GenerationSettings, InternVLChat
from services.language_decoder.config import DecoderConfig
from services.language_decoder.engine import SamplingParams
from services.language_decoder.prompt import IMAGE_PLACEHOLDER, build_chat_prompt, video_question
from services.language_decoder.tokenizer_loader import Tokenizer, load_tokenizer
from services.vision_encoder.config import EncoderConfig
from services.vision_encoder.preprocess import load_image, load_video, open_image
from services.vision_encoder.servicer import IMAGE_FORMAT_NAMES

PROG = "internvl-chat"
# The limits of the services' default deployment, so the CLI accepts what they accept: prompt and
# answer share the decoder's context; video frames are sampled as the encoder samples them.
CONTEXT_TOKENS = DecoderConfig.max_model_len
MAX_FRAMES = EncoderConfig.max_video_segments
DEFAULT_FRAMES = EncoderConfig.default_video_segments


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("question", help='the user turn; "<image>" marks where the images go')
    p.add_argument("--model", required=True, help="checkpoint dir or Hub repo id")
    p.add_argument("-v", "--verbose", action="store_true", help="print progress, and the traceback of a failure")
    media = p.add_argument_group("images and video")
    media.add_argument("--image", action="append", default=[], metavar="FILE",
                       help=f"image file ({IMAGE_FORMAT_NAMES}); repeat for several")
    media.add_argument("--combine", action="store_true", help="put all images' tiles in one <image> block")
    media.add_argument("--video", metavar="FILE", help="video file (frames sampled with decord)")
    media.add_argument("--frames", type=int, metavar="N",
                       help=f"video frames to sample (1..{MAX_FRAMES}, default {DEFAULT_FRAMES})")
    media.add_argument("--max-tiles", type=int, metavar="N",
                       help=f"448 px tiles per image (1..{MAX_TILES_LIMIT}; default: the checkpoint's "
                            "max_dynamic_patch, 12 for InternVL2)")
    placement = p.add_argument_group("model placement")
    placement.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                           help="cpu, cuda or cuda:N (default: cuda when there is one)")
    placement.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    placement.add_argument("--quantize", default=NO_QUANTIZATION, choices=QUANTIZE_CHOICES,
                           help="int8: the language decoder's block weights as int8 (close to, not identical "
                                "with, none)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=512,
                     help=f"answer length cap (1..{CONTEXT_TOKENS}; prompt and answer share {CONTEXT_TOKENS} tokens)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=finite_float, default=1.0)
    gen.add_argument("--top-p", type=finite_float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--repetition-penalty", type=finite_float, default=1.0)
    gen.add_argument("--seed", type=int)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, checked: a problem exits 2 with argparse's usage line and the reason."""
    p = build_parser()
    args = p.parse_args(argv)
    problem = argument_problem(args)
    if problem:
        p.error(problem)
    return args


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, without reading any file; None when nothing is."""
    if args.image and args.video:
        return "give --image or --video, not both"
    if args.combine and len(args.image) < 2:
        return "--combine needs at least two --image"
    if args.frames is not None and not args.video:
        return "--frames needs --video"
    if args.frames is not None and not 1 <= args.frames <= MAX_FRAMES:
        return f"--frames must be in [1, {MAX_FRAMES}], got {args.frames}"
    if args.max_tiles is not None and not 1 <= args.max_tiles <= MAX_TILES_LIMIT:
        return f"--max-tiles must be in [1, {MAX_TILES_LIMIT}], got {args.max_tiles}"
    if not 1 <= args.max_new_tokens <= CONTEXT_TOKENS:
        return (f"--max-new-tokens must be in [1, {CONTEXT_TOKENS}] (prompt and answer share {CONTEXT_TOKENS} "
                f"tokens), got {args.max_new_tokens}")
    try:
        generation_settings(args)
    except ValueError as exc:  # the engine's own range checks, naming the setting
        return f"bad sampling settings: {exc}"
    try:
        parse_dtype(args.dtype, "cpu")
    except ValueError as exc:
        return f"--dtype: {exc}"
    return device_problem(args.device)


def device_problem(name: str) -> str | None:
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a device; use cpu, cuda or cuda:N"
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            return f"--device {name}: no CUDA device is visible here; use --device cpu"
        if device.index is not None and device.index >= count:
            return f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    """The sampling flags, validated by the decoder engine's SamplingParams (ValueError names the bad one)."""
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    return GenerationSettings(
        max_new_tokens=params.max_new_tokens,
        do_sample=not params.greedy,  # temperature 0 means greedy, as in the services
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        seed=params.seed,
    )


@dataclass(frozen=True)
class Checkpoint:
    """What is read of a checkpoint before its weights: enough to check the inputs against it."""

    root: Path
    config: InternVLConfig
    tokenizer: Tokenizer


def open_checkpoint(model: str) -> Checkpoint:
    try:
        root = resolve_model_dir(model)
    except CheckpointError as exc:  # its message says what --model should be
        raise UsageError(str(exc)) from exc
    try:
        config = InternVLConfig.from_dir(root)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable, not JSON, or not this layout
        raise UsageError(f"{root / 'config.json'} is not an InternVL2 config ({type(exc).__name__}: {exc}); "
                         "give --model an InternVL2 checkpoint directory") from exc
    try:
        tokenizer = load_tokenizer(root)
    except (OSError, ValueError) as exc:  # TokenizerError is a ValueError, as is a broken JSON file
        raise UsageError(f"cannot load the tokenizer of {root} ({exc}); the checkpoint needs its "
                         "tokenizer files (tokenizer_config.json and the files it names)") from exc
    return Checkpoint(root, config, tokenizer)


@dataclass(frozen=True)
class Inputs:
    """The question with its images' pixels, as `InternVLChat.chat` takes them."""

    question: str
    pixel_values: torch.Tensor | None = None
    num_patches_list: list[int] | None = None  # tiles per <image> block


def read_inputs(args: argparse.Namespace, config: InternVLConfig) -> Inputs:
    if args.video:
        return read_video(args.video, args.question, args.frames or DEFAULT_FRAMES, args.verbose)
    if not args.image:
        return Inputs(args.question)
    # The encoder service's default too.
    tiles = [read_image(path, args.max_tiles or config.max_dynamic_patch) for path in args.image]
    pixel_values = torch.cat(tiles)
    if len(tiles) == 1 or args.combine:
        return Inputs(args.question, pixel_values, [pixel_values.shape[0]])
    question = args.question
    if IMAGE_PLACEHOLDER not in question:
        question = "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(len(tiles))) + question
    return Inputs(question, pixel_values, [t.shape[0] for t in tiles])


def read_image(path: str, max_tiles: int) -> torch.Tensor:
    data = read_file(path, "image")
    if not data:
        raise UsageError(f"image {path} is empty; give a {IMAGE_FORMAT_NAMES} file")
    try:
        image = open_image(data)
    except ValueError as exc:
        if isinstance(exc.__cause__, UnidentifiedImageError):
            raise UsageError(f"image {path} is not a {IMAGE_FORMAT_NAMES} image, or its header is damaged") from exc
        raise UsageError(f"cannot decode image {path}: {exc.__cause__ or exc}; the file is damaged") from exc
    return load_image(image, max_num=max_tiles)


def read_video(path: str, question: str, frames: int, verbose: bool) -> Inputs:
    data = read_file(path, "video")
    try:
        with native_stderr_held(replay=verbose):
            pixel_values, num_patches_list = load_video(data, num_segments=frames, max_num=1)
    except ValueError as exc:  # decord's failures, an empty file, no frames
        raise UsageError(f"video {path}: {exc}; give an MP4/H.264 or another format ffmpeg reads") from exc
    return Inputs(video_question(question, len(num_patches_list)), pixel_values, num_patches_list)


@contextlib.contextmanager
def native_stderr_held(replay: bool) -> Iterator[None]:
    """Hold back what native code writes to fd 2 (decord logs its errors there, then raises them)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if replay:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


def prompt_tokens(checkpoint: Checkpoint, inputs: Inputs) -> int:
    """The prompt's length in tokens, checked against the context before anything runs."""
    try:
        prompt, _ = build_chat_prompt(inputs.question, None, inputs.num_patches_list,
                                      checkpoint.config.num_image_token)
    except ValueError as exc:  # placeholder count vs image count
        raise UsageError(f"{exc}; write one {IMAGE_PLACEHOLDER} per image in the question, or none") from exc
    count = len(checkpoint.tokenizer.encode(prompt))
    if count >= CONTEXT_TOKENS:
        tiles = sum(inputs.num_patches_list or ())
        raise UsageError(
            f"the prompt is {count} tokens ({tiles} image tiles of {checkpoint.config.num_image_token} tokens each); "
            f"the context holds {CONTEXT_TOKENS} (prompt + answer): use fewer images, a lower --max-tiles, "
            "fewer --frames or a shorter question"
        )
    return count


def load_model(checkpoint: Checkpoint, device: str, dtype: str, quantize: str, show_progress: bool) -> InternVLChat:
    # The loaders draw progress bars on sys.stderr: for a person at a terminal, not for a log or a pipe.
    held = contextlib.nullcontext() if show_progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with held:
            return InternVLChat.load(checkpoint.root, device=device, dtype=dtype, quantize=quantize)
    except CheckpointError as exc:
        raise UsageError(f"{exc}; --model must be a complete, unmodified InternVL2 checkpoint") from exc
    except SafetensorError as exc:
        raise UsageError(f"the weights in {checkpoint.root} do not read ({exc}); "
                         "the download is incomplete or the files are corrupt: fetch them again") from exc


def run(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        if args.verbose:
            print(message, file=sys.stderr, flush=True)

    settings = generation_settings(args)
    checkpoint = open_checkpoint(args.model)
    inputs = read_inputs(args, checkpoint.config)
    prompt_len = prompt_tokens(checkpoint, inputs)
    # As the decoder service does, the answer stops where the context ends.
    settings = replace(settings, max_new_tokens=min(settings.max_new_tokens, CONTEXT_TOKENS - prompt_len))
    started = time.monotonic()
    model = load_model(checkpoint, args.device, args.dtype, args.quantize, args.verbose or sys.stderr.isatty())
    progress(f"loaded {checkpoint.root} on {args.device} in {time.monotonic() - started:.1f}s")
    progress(f"prompt: {prompt_len} tokens; generating at most {settings.max_new_tokens} tokens")
    response, _ = model.chat(inputs.question, inputs.pixel_values, inputs.num_patches_list, generation=settings)
    try:
        print(response, flush=True)
    except OSError as exc:
        # What is still buffered must not fail again at exit (Python would print it and exit 120).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return _report(args, f"cannot write the answer to stdout: {exc.strerror or exc}", EXIT_FAILURE)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tolerate_unprintable_output()
    try:
        return run(args)
    except UsageError as exc:
        return _report(args, str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        return _report(args, "interrupted", EXIT_INTERRUPTED)
    except torch.cuda.OutOfMemoryError:
        return _report(args, f"out of GPU memory on {args.device}: use a lower --max-tiles, fewer images, "
                             "a smaller --max-new-tokens or a GPU with more free memory", EXIT_FAILURE)
    except Exception as exc:
        hint = "" if args.verbose else " (run with -v for the traceback)"
        return _report(args, f"{type(exc).__name__}: {exc}{hint}", EXIT_FAILURE)


def _report(args: argparse.Namespace, message: str, code: int) -> int:
    if args.verbose:
        traceback.print_exc()
    return fail(PROG, message, code)


if __name__ == "__main__":
    sys.exit(main())
