"""Flags with environment-variable defaults, for the services' frozen config dataclasses.

Every flag `--some-flag` defaults to `<PREFIX>SOME_FLAG`, then to the dataclass field's default,
so containers configure by env and people by flags.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping
from typing import Any

from services.common.logging import LOG_FORMATS
from services.common.security import SecurityConfigError, ServerTls, is_loopback_host

_NO_DEFAULT = object()


class EnvFlags:
    def __init__(self, parser: argparse.ArgumentParser, prefix: str, defaults: Mapping[str, Any],
                 env: Mapping[str, str]):
        self.parser = parser
        self.prefix = prefix
        self.defaults = defaults  # dataclass __dataclass_fields__
        self.env = env

    def env_name(self, flag: str) -> str:
        return self.prefix + flag.removeprefix("--").replace("-", "_").upper()

    def add(self, flag: str, kind: Callable[[str], Any], help_: str, *, default: Any = _NO_DEFAULT,
            **kw: Any) -> None:
        """`default` overrides the dataclass field's default (for flags that are not fields)."""
        dest = flag.removeprefix("--").replace("-", "_")
        env_name = self.env_name(flag)
        raw = self.env.get(env_name)
        if default is _NO_DEFAULT:
            default = self.defaults[dest].default
        try:
            default = kind(raw) if raw not in (None, "") else default
        except ValueError as exc:
            self.parser.error(f"{env_name}={raw!r}: {exc}")
        self.parser.add_argument(flag, type=kind, default=default, help=f"{help_} (env {env_name})", **kw)

    def add_switch(self, flag: str, help_: str) -> None:
        """A flag without a value (`--insecure-open`); its env var takes 1/true/yes/on or 0/false/no/off."""
        env_name = self.env_name(flag)
        raw = self.env.get(env_name)
        try:
            default = parse_bool(raw) if raw not in (None, "") else False
        except ValueError as exc:
            self.parser.error(f"{env_name}={raw!r}: {exc}")
        self.parser.add_argument(flag, action="store_true", default=default, help=f"{help_} (env {env_name})")


def add_serving_flags(flags: EnvFlags) -> None:
    """The flags every service has for logs, metrics and TLS (dataclass fields of the same names)."""
    flags.add("--log-level", str, "logging level")
    flags.add("--log-format", str, "log lines as text or JSON (one object per line)", choices=LOG_FORMATS)
    flags.add("--metrics-port", int, "Prometheus /metrics port (0 = off)")
    flags.add("--metrics-host", str, "metrics bind address (default: the same as --host)")
    flags.add("--tls-cert", str, "PEM certificate chain: serve TLS (with --tls-key)")
    flags.add("--tls-key", str, "PEM private key of --tls-cert")
    flags.add("--tls-ca", str, "PEM CA bundle: require client certificates it signed (mutual TLS)")
    flags.add("--health-port", int, "plaintext port serving only grpc.health.v1, for probes that cannot "
              "present a client certificate (Kubernetes' native gRPC probes); 0 = off")
    flags.add_switch("--allow-unauthenticated-peers", "serve a non-loopback --host without mutual TLS: whoever "
                     "reaches the port may call the model (and fill the decoder's caches); only behind a mesh "
                     "that authenticates peers itself")


def serving_problems(cfg: Any) -> list[str]:
    """What is wrong with the fields `add_serving_flags` sets (empty when nothing)."""
    problems = []
    if not isinstance(logging.getLevelName(str(cfg.log_level).upper()), int):
        problems.append("--log-level must be a level name (DEBUG, INFO, WARNING, ERROR)")
    if cfg.log_format not in LOG_FORMATS:
        problems.append(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
    if not 0 <= cfg.metrics_port <= 65535:
        problems.append("--metrics-port must be in [0, 65535]")
    if not 0 <= cfg.health_port <= 65535:
        problems.append("--health-port must be in [0, 65535]")
    try:
        tls = server_tls(cfg)
    except SecurityConfigError as exc:
        problems.append(str(exc))
    else:
        problems += peer_trust_problems(cfg.host, tls, cfg.allow_unauthenticated_peers)
    return problems


def peer_trust_problems(host: str, tls: ServerTls | None, allow_unauthenticated: bool) -> list[str]:
    """The encoder and decoder trust their callers (the decoder caches what they send): beyond this machine
    they take calls only from peers with a certificate from --tls-ca, unless told otherwise."""
    if is_loopback_host(host) or (tls is not None and tls.mutual) or allow_unauthenticated:
        return []
    return [f"--host {host} reaches beyond this machine, and without mutual TLS anyone who reaches it could "
            "call the model and place entries in its caches: give --tls-cert, --tls-key and --tls-ca (certificates "
            "from `make certs`), bind 127.0.0.1, or pass --allow-unauthenticated-peers if a service mesh "
            "authenticates peers"]


def server_tls(cfg: Any) -> ServerTls | None:
    return ServerTls.from_flags(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")
