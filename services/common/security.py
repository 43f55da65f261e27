"""TLS credentials from certificate files, API keys, and keeping secrets out of logs.

Server side, `--tls-cert/--tls-key` turn on TLS and adding `--tls-ca` requires clients to present a
certificate signed by that CA (mutual TLS). Client side (the gateway's hops to its peers), a CA
verifies the server and a certificate/key pair identifies the client to an mTLS server.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
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

# A key's name is its tenant: what sessions are owned by, what logs and metrics may show. Names are
# plain tokens so they are safe in a log line or a label.
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ANONYMOUS_TENANT = "anonymous"  # the one tenant of an --insecure-open gateway


def load_api_keys(keys_file: str = "", keys_env: str = "") -> tuple[str, ...]:
    """Key entries from a file (one per line; blank lines and `#` comments skipped) and a comma-separated
    list. An entry is `name:key` or a plain `key` (see `parse_key_entry`)."""
    keys: list[str] = []
    if keys_file:
        text = _read(keys_file, "--api-keys-file").decode("utf-8")
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    keys += [k.strip() for k in keys_env.split(",") if k.strip()]
    for k in keys:
        if any(c.isspace() or not c.isprintable() for c in k):
            raise SecurityConfigError("API keys must be printable and contain no whitespace")
        parse_key_entry(k)  # a malformed name fails at start, not at the first request
    return tuple(dict.fromkeys(keys))  # de-duplicated, in order


def derived_key_name(key: str) -> str:
    """The tenant name of an unnamed key: `key-` and 8 hex digits of its sha256 (not the key, and too
    short to help guess it)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_key_entry(entry: str) -> tuple[str, str]:
    """(name, key) of a keys-file entry: `name:key` (split at the first colon), or a plain `key`, named
    by `derived_key_name`. A key that itself holds a colon must therefore be given a name."""
    name, sep, key = entry.partition(":")
    if not sep:
        return derived_key_name(entry), entry
    if not _KEY_NAME.fullmatch(name) or not key:
        raise SecurityConfigError(
            "an API key entry is 'name:key' (name: letters, digits, '.', '_', '-', at most 64) or a plain key "
            "without ':'")
    return name, key


class ApiKeys:
    """Checks a presented key against every configured key in constant time, and names its tenant.

    Every comparison runs (no early exit), so the time taken does not tell which key, or how much of
    one, matched. The keys are never part of any repr.
    """

    def __init__(self, entries: Iterable[str]):
        named = [parse_key_entry(e) for e in entries]
        self._keys = [(name, key.encode()) for name, key in named]
        if not self._keys:
            raise SecurityConfigError("no API keys configured")
        names = [name for name, _ in named]
        if len(set(names)) != len(names):
            raise SecurityConfigError("two API keys share a name: give each key its own name ('name:key')")

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._keys)} keys>)"

    def identify(self, presented: str) -> str | None:
        """The name of the key presented, or None when it is none of them."""
        candidate = presented.encode()
        found = None
        for name, key in self._keys:
            if hmac.compare_digest(candidate, key) and found is None:
                found = name
        return found

    def check(self, presented: str) -> bool:
        return self.identify(presented) is not None


def is_loopback_host(host: str) -> bool:
    """Whether a bind address only this machine can reach (`localhost`, 127.0.0.0/8, ::1)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------- redaction

# Peer addresses as gRPC words them in error details (`ipv4:127.0.0.1:4`, `ipv6:[::1]:50053`,
# `unix:/run/x.sock`) and plain host:port pairs: internal topology a client has no business seeing.
_ADDRESS = re.compile(
    r"\b(?:ipv4|ipv6|unix|unix-abstract|dns):(?:\[[0-9A-Fa-f:.]+\])?[^\s,;)\]\"']*"
    r"|\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\](?::\d+)?"  # [v6]:port (a colon inside: not `images[0]`)
    r"|\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?"
    r"|\b[A-Za-z0-9.-]*[A-Za-z][A-Za-z0-9.-]*:\d{2,5}\b"
)


def redact_addresses(text: str) -> str:
    """`text` with network addresses replaced by `<address>` (for messages clients see; logs keep them)."""
    return _ADDRESS.sub("<address>", text)


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

