"""How the command-line tools (`internvl-client`, `internvl-chat`) report a failure: one convention.

A failure is one line `PROG: what went wrong and what to fix` on stderr, never a traceback (a
`--verbose` tool may print one first), and the exit status says whose move it is:

- EXIT_FAILURE (1): the command was fine but running it failed (an RPC error, out of memory, ...);
- EXIT_USAGE (2): bad arguments or bad input the user must fix (argparse exits 2 as well);
- EXIT_INTERRUPTED (130 = 128 + SIGINT): stopped with Ctrl-C, as a shell reports it.

Torch-free (the client imports it).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT


class UsageError(Exception):
    """Bad arguments or input (a missing file, an image that does not decode, ...): exit EXIT_USAGE.

    The message names the problem and what to fix; it is printed as it is, after the program name.
    """


def tolerate_unprintable_output() -> None:
    """A model may answer in any script; a terminal that cannot show a character gets an escape, not a crash."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def fail(prog: str, message: str, code: int) -> int:
    """Print `PROG: message` to stderr and return `code`, the exit status to end with."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    return code


def read_file(path: str, what: str) -> bytes:
    """The bytes of an input file the user named; UsageError (naming `what` and the path) if unreadable."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
