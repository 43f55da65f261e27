"""TLS credentials from certificate files, API keys, and keeping secrets out of logs.

Server side, `--tls-cert/--tls-key` turn on TLS and adding `--tls-ca` requires clients to present a
certificate signed by that CA (mutual TLS). Client side (the gateway's hops to its peers), a CA
verifies the server and a certificate/key pair identifies the client to an mTLS server.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc


class SecurityConfigError(ValueError):
    """Certificate or key settings that cannot work; the message names the flags."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from exc
    if not data.strip():
        raise SecurityConfigError(f"{what} {path!r} is empty")
    return data


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key (PEM files), and optionally the CA its clients must use."""

    cert: str = ""
    key: str = ""
    ca: str = ""  # set: clients must present a certificate signed by this CA (mutual TLS)

    @classmethod
    def from_flags(cls, cert: str, key: str, ca: str) -> ServerTls | None:
        """None for plaintext; raises SecurityConfigError for a half-configured pair."""
        if not (cert or key or ca):
            return None
        if not (cert and key):
            raise SecurityConfigError("--tls-cert and --tls-key go together (and --tls-ca needs both)")
        return cls(cert, key, ca)

    @property
    def mutual(self) -> bool:
        return bool(self.ca)

    def credentials(self) -> grpc.ServerCredentials:
        ca = _read(self.ca, "--tls-ca") if self.ca else None
        return grpc.ssl_server_credentials(
            [(_read(self.key, "--tls-key"), _read(self.cert, "--tls-cert"))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    """How a client verifies its server (CA; empty = the system's roots) and, for mTLS, who it is."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    flag_prefix: str = "--peer-tls"  # names the flags in error messages

    @classmethod
    def from_flags(cls, ca: str, cert: str, key: str, prefix: str = "--peer-tls") -> ClientTls | None:
        if not (ca or cert or key):
            return None
        if bool(cert) != bool(key):
            raise SecurityConfigError(f"{prefix}-cert and {prefix}-key go together")
        return cls(ca, cert, key, prefix)

    def credentials(self) -> grpc.ChannelCredentials:
        p = self.flag_prefix
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, f"{p}-ca") if self.ca else None,
            private_key=_read(self.key, f"{p}-key") if self.key else None,
            certificate_chain=_read(self.cert, f"{p}-cert") if self.cert else None,
        )


# ---------------------------------------------------------------------------------------- API keys


def load_api_keys(keys_file: str = "", keys_env: str = "") -> tuple[str, ...]:
    """Keys from a file (one per line; blank lines and `#` comments skipped) and a comma-separated list."""
    keys: list[str] = []
    if keys_file:
        text = _read(keys_file, "--api-keys-file").decode("utf-8")
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    keys += [k.strip() for k in keys_env.split(",") if k.strip()]
    for k in keys:
        if any(c.isspace() or not c.isprintable() for c in k):
            raise SecurityConfigError("API keys must be printable and contain no whitespace")
    return tuple(dict.fromkeys(keys))  # de-duplicated, in order


class ApiKeys:
    """Checks a presented key against every configured key in constant time.

    Every comparison runs (no early exit), so the time taken does not tell which key, or how much of
    one, matched. The keys are never part of any repr.
    """

    def __init__(self, keys: Iterable[str]):
        self._keys = [k.encode() for k in keys]
        if not self._keys:
            raise SecurityConfigError("no API keys configured")

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._keys)} keys>)"

    def check(self, presented: str) -> bool:
        candidate = presented.encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched


# ---------------------------------------------------------------------------------------- redaction


def redact_url(url: str) -> str:
    """`rediss://user:secret@host:6380/0` -> `rediss://user:***@host:6380/0` (for logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

