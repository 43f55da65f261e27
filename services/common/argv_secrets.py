"""Secrets stay off command lines: any process on the machine can read another's argv (`ps`,
/proc/PID/cmdline), and launchers, supervisors and crash reports log it. Passwords and keys come from
files or the environment instead (Kubernetes: a Secret as a file or a `secretKeyRef`; compose: secrets).

The one kind of flag value that can carry a secret is a URL with a password (`redis://:pw@host`);
API keys and TLS keys have file flags only. `argv_secret_problem` finds such a value wherever it is on
a command line (whatever flag, abbreviation or `--flag=value` form), so a service can refuse to start.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from services.common.security import redact_url


def has_password(value: str) -> bool:
    """Whether `value` is a URL with a password in it (`scheme://user:password@host`)."""
    if "://" not in value or "@" not in value:
        return False
    try:
        return bool(urlsplit(value).password)
    except ValueError:
        return False


def argv_secret_problem(argv: Sequence[str], where_instead: str) -> str | None:
    """What to fix if a command-line argument holds a password (None: none does). `where_instead`
    names the environment variables (or files) that take the value instead."""
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
        if has_password(value):
            return (f"{redact_url(value)}: a password on the command line shows in every process listing "
                    f"(ps, /proc/PID/cmdline); give this URL in {where_instead} instead (from a secret or an "
                    "env file), never as a flag value")
    return None
