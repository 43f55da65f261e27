"""Command-line client of the public API: `python -m gateway.cli "What is in the picture?" --image a.jpg`.

Streams the answer to stdout as it arrives (ChatStream). Torch-free: it only needs grpcio and the
generated code in internvl/v1, so it runs on any machine that can reach a gateway.

    python -m gateway.cli --target 127.0.0.1:50051 --image a.jpg "Describe the image."
    python -m gateway.cli --image a.jpg --image b.jpg "Compare the two images."   # Image-1/Image-2
    python -m gateway.cli --image a.jpg --image b.jpg --combine "Describe."       # one <image> block
    python -m gateway.cli --video clip.mp4 --frames 8 "What happens?"
    python -m gateway.cli --new-session --image a.jpg "Describe the image."      # prints the id
    python -m gateway.cli --session ID "And what color is it?"                   # next turn

A gateway that requires API keys gets one from `IVL_API_KEY` or `--api-key-file` (sent as
`authorization: Bearer <key>`; never a flag value, so it stays out of process listings). `--tls`
(system roots) or `--tls-ca FILE` talk TLS, with `--tls-cert/--tls-key` for mutual TLS.

The session id, when one is used, goes to stderr as `session: ID`, so stdout holds only the
answer. On a gRPC error it prints `internvl-client: CODE: message` to stderr and exits 1 (2 for
bad arguments or unreadable files, 130 on Ctrl-C: the convention of services/common/cli.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc

from internvl.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc, vision_pb2
from services.common.cli import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    UsageError,
    fail,
    read_file,
    tolerate_unprintable_output,
)
from services.common.security import SecurityConfigError, parse_key_entry

PROG = "internvl-client"
DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "IVL_GATEWAY_TARGET"
API_KEY_ENV = "IVL_API_KEY"
_MiB = 1024 * 1024
# Requests carry whole image and video files; the gateway accepts up to 64 MiB.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * _MiB),
    ("grpc.max_receive_message_length", 64 * _MiB),
]

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Ask an InternVL2 gateway one question; the answer streams to stdout.",
    )
    p.add_argument("question", help='the user turn ("-" reads it from stdin); "<image>" marks where images go')
    p.add_argument("--target", default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
                   help=f"gateway address host:port (env {TARGET_ENV}; default {DEFAULT_TARGET})")
    p.add_argument("--model", default="", help="served model name (a gateway fronting several; default: its first)")
    conn = p.add_argument_group("connection")
    conn.add_argument("--api-key-file", metavar="FILE",
                      help=f"file whose first line is the API key (default: env {API_KEY_ENV})")
    conn.add_argument("--tls", action="store_true", help="use TLS, verifying the gateway with the system's roots")
    conn.add_argument("--tls-ca", metavar="FILE", help="use TLS, verifying the gateway with this PEM CA")
    conn.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate (mutual TLS; with --tls-key)")
    conn.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    media = p.add_argument_group("images and video")
    media.add_argument("--image", action="append", default=[], metavar="FILE",
                       help="image file (PNG, JPEG, WebP, ...); repeat for several")
    media.add_argument("--combine", action="store_true",
                       help="put all images' tiles behind one <image> block instead of Image-1, Image-2, ...")
    media.add_argument("--video", metavar="FILE", help="video file (e.g. MP4), decoded on the encoder")
    media.add_argument("--frames", type=int, default=0, metavar="N",
                       help="video frames to sample (0 = server default, 8)")
    media.add_argument("--max-tiles", type=int, default=0, metavar="N",
                       help="max 448 px tiles per image, or per video frame (0 = server default)")
    sess = p.add_argument_group("sessions (multi-turn history kept by the gateway)")
    sess.add_argument("--session", metavar="ID", help="continue this session")
    sess.add_argument("--new-session", action="store_true", help="create a session for this turn; prints its id")
    sess.add_argument("--system-message", help="system message of the new session (with --new-session)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=0, help="0 = server default")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string; repeat for several")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline of each call in seconds (default 600)")
    p.add_argument("-v", "--verbose", action="store_true", help="print finish reason and token usage to stderr")
    args = p.parse_args(argv)
    if args.image and args.video:
        p.error("give --image or --video, not both")
    if args.session and args.new_session:
        p.error("give --session or --new-session, not both")
    if args.system_message is not None and not args.new_session:
        p.error("--system-message needs --new-session")
    if args.combine and len(args.image) < 2:
        p.error("--combine needs at least two --image")
    if args.frames and not args.video:
        p.error("--frames needs --video")
    if args.frames < 0 or args.max_tiles < 0 or args.max_new_tokens < 0:
        p.error("--frames, --max-tiles and --max-new-tokens must be >= 0")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    return args


def sampling_params(args: argparse.Namespace) -> decoder_pb2.SamplingParams:
    params = decoder_pb2.SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=args.sample, stop=args.stop)
    # Unset optionals keep the server's (upstream's) defaults.
    for field in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        value = getattr(args, field)
        if value is not None:
            setattr(params, field, value)
    return params


def build_request(args: argparse.Namespace, question: str, session_id: str = "") -> gateway_pb2.ChatRequest:
    request = gateway_pb2.ChatRequest(session_id=session_id, text=question, generation=sampling_params(args),
                                      model=args.model)
    for path in args.image:
        request.images.add(data=read_file(path, "image"))
    if args.video:
        request.video.CopyFrom(vision_pb2.VideoInput(data=read_file(args.video, "video"), num_segments=args.frames))
    if args.combine:
        request.image_layout = gateway_pb2.IMAGE_LAYOUT_COMBINED
    if args.max_tiles:
        request.tiling.max_tiles = args.max_tiles
    return request


def api_key(args: argparse.Namespace) -> str:
    if args.api_key_file:
        text = read_file(args.api_key_file, "API key file").decode("utf-8", errors="replace")
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise UsageError(f"no API key in {args.api_key_file}")
        try:  # the gateway's keys file may be given: `name:key` lines
            return parse_key_entry(keys[0])[1]
        except SecurityConfigError as exc:
            raise UsageError(f"{args.api_key_file}: {exc}") from exc
    return os.environ.get(API_KEY_ENV, "").strip()


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    if not (args.tls or args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.target, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_file(args.tls_ca, "CA certificate") if args.tls_ca else None,
        private_key=read_file(args.tls_key, "client key") if args.tls_key else None,
        certificate_chain=read_file(args.tls_cert, "client certificate") if args.tls_cert else None,
    )
    return grpc.secure_channel(args.target, credentials, options=CHANNEL_OPTIONS)


def _question(args: argparse.Namespace) -> str:
    if args.question == "-":
        return sys.stdin.read()
    return args.question


def run(args: argparse.Namespace) -> int:
    question = _question(args)
    request = build_request(args, question, args.session or "")  # reads the files before connecting
    key = api_key(args)
    metadata = [("authorization", f"Bearer {key}")] if key else None
    with open_channel(args) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        if args.new_session:
            create = gateway_pb2.CreateSessionRequest()
            if args.system_message is not None:
                create.system_message = args.system_message
            request.session_id = stub.CreateSession(create, timeout=args.timeout, metadata=metadata).session_id
        if request.session_id:
            print(f"session: {request.session_id}", file=sys.stderr, flush=True)
        last = None
        printed = False
        call = stub.ChatStream(request, timeout=args.timeout, metadata=metadata)
        try:
            for part in call:
                if part.text:
                    sys.stdout.write(part.text)
                    sys.stdout.flush()
                    printed = True
                last = part
        except BaseException:
            call.cancel()  # Ctrl-C: stop generation on the server too
            if printed:
                sys.stdout.write("\n")
                sys.stdout.flush()
            raise
        sys.stdout.write("\n")
        sys.stdout.flush()
    if args.verbose and last is not None:
        reason = decoder_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        u = last.usage
        print(f"finish: {reason}; tokens: prompt {u.prompt_tokens} (cached {u.cached_prompt_tokens}), "
              f"completion {u.completion_tokens}", file=sys.stderr)
    for box in last.boxes if last is not None else ():  # grounding answers, parsed by the gateway
        unit = "px" if box.HasField("image_index") else "fraction"
        print(f"box: {box.label!r} [{box.x1:g}, {box.y1:g}, {box.x2:g}, {box.y2:g}] ({unit})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tolerate_unprintable_output()
    try:
        return run(args)
    except UsageError as exc:
        return fail(PROG, str(exc), EXIT_USAGE)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if code is not None else "UNKNOWN"
        hint = ""
        if code == grpc.StatusCode.UNAUTHENTICATED:
            hint = f"; give the gateway's API key in {API_KEY_ENV} or with --api-key-file"
        return fail(PROG, f"{name}: {details} (target {args.target}){hint}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return fail(PROG, "interrupted", EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
