"""Flags with environment-variable defaults, for the services' frozen config dataclasses.

Every flag `--some-flag` defaults to `<PREFIX>SOME_FLAG`, then to the dataclass field's default,
so containers configure by env and people by flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any


class EnvFlags:
    def __init__(self, parser: argparse.ArgumentParser, prefix: str, defaults: Mapping[str, Any],
                 env: Mapping[str, str]):
        self.parser = parser
        self.prefix = prefix
        self.defaults = defaults  # dataclass __dataclass_fields__
        self.env = env

    def add(self, flag: str, kind: Callable[[str], Any], help_: str, **kw: Any) -> None:
        dest = flag.removeprefix("--").replace("-", "_")
        env_name = self.prefix + dest.upper()
        raw = self.env.get(env_name)
        try:
            default = kind(raw) if raw not in (None, "") else self.defaults[dest].default
        except ValueError as exc:
            self.parser.error(f"{env_name}={raw!r}: {exc}")
        self.parser.add_argument(flag, type=kind, default=default, help=f"{help_} (env {env_name})", **kw)


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")
