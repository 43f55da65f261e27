"""Per-tenant quotas as the operator writes them: a JSON file named by `--quota-file`.

    {
      "default": {"requests_per_minute": 600, "tokens_per_minute": 200000, "concurrent_requests": 16,
                  "live_sessions": 1000, "session_bytes": 1073741824, "max_session_ttl_s": 86400},
      "tenants": {
        "alice": {"requests_per_minute": 60},
        "batch-jobs": {"tokens_per_minute": "unlimited", "concurrent_requests": 64}
      }
    }

A tenant is an API key's name (`name:key` in the keys file; a plain key's name is `key-` and 8 hex
digits of its sha256, as the gateway logs it at start). A tenant's entry overrides `default` field by
field; a field missing from both, or `"unlimited"`, is no limit. `0` allows nothing (e.g. no sessions).
The keys stay in their own file or environment variable: this file holds names and numbers only.
An --insecure-open gateway has one tenant, `anonymous`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

UNLIMITED = "unlimited"


class QuotaConfigError(ValueError):
    """A quota file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Quota:
    """One tenant's limits; None = unlimited."""

    requests_per_minute: int | None = None  # chat calls (each BatchChat item, each HTTP choice)
    tokens_per_minute: int | None = None  # generated tokens (reserved from max_new_tokens, refunded at the end)
    concurrent_requests: int | None = None  # chat calls in progress (streams and unary calls)
    live_sessions: int | None = None  # sessions not yet expired or deleted
    session_bytes: int | None = None  # text and media stored in the tenant's live sessions
    max_session_ttl_s: int | None = None  # a longer requested session TTL is lowered to this

    @property
    def limits_calls(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute,
                                           self.concurrent_requests))

    @property
    def limits_sessions(self) -> bool:
        return self.live_sessions is not None or self.session_bytes is not None


FIELDS = tuple(f.name for f in fields(Quota))
NO_QUOTA = Quota()


@dataclass(frozen=True)
class QuotaTable:
    """Every tenant's quota: its own entry over the default."""

    default: Quota = NO_QUOTA
    tenants: Mapping[str, Quota] = field(default_factory=dict)

    def of(self, tenant: str) -> Quota:
        return self.tenants.get(tenant, self.default)

    @property
    def limits_anything(self) -> bool:
        return any(q != NO_QUOTA for q in (self.default, *self.tenants.values()))


def _entry(raw: object, where: str, base: Quota) -> Quota:
    if not isinstance(raw, dict):
        raise QuotaConfigError(f"{where} must be an object of limits ({', '.join(FIELDS)})")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise QuotaConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    values = {}
    for name, value in raw.items():
        if value == UNLIMITED or value is None:
            values[name] = None
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            if name == "max_session_ttl_s" and value == 0:
                raise QuotaConfigError(f"{where}.{name} must be >= 1 second (or {UNLIMITED!r})")
            values[name] = value
        else:
            raise QuotaConfigError(f"{where}.{name} must be a whole number >= 0 or {UNLIMITED!r}, got {value!r}")
    return replace(base, **values)


def parse_quotas(doc: object, tenants: Iterable[str], source: str = "the quota file") -> QuotaTable:
    """The table a quota document describes; `tenants` are the names the gateway's keys give (a name
    the file mentions that no key has is a typo, refused)."""
    if not isinstance(doc, dict):
        raise QuotaConfigError(f"{source} must hold a JSON object with 'default' and/or 'tenants'")
    unknown = sorted(set(doc) - {"default", "tenants"})
    if unknown:
        raise QuotaConfigError(f"{source}: unknown top-level field(s) {', '.join(unknown)} "
                               "(expected 'default' and 'tenants')")
    default = _entry(doc.get("default", {}), f"{source}: default", NO_QUOTA)
    raw_tenants = doc.get("tenants", {})
    if not isinstance(raw_tenants, dict):
        raise QuotaConfigError(f"{source}: 'tenants' must map tenant names to limits")
    known = set(tenants)
    strangers = sorted(set(raw_tenants) - known)
    if strangers:
        raise QuotaConfigError(f"{source}: no API key is named {', '.join(strangers)} (the keys' names: "
                               f"{', '.join(sorted(known)) or 'none'})")
    return QuotaTable(default, {name: _entry(raw, f"{source}: tenants.{name}", default)
                                for name, raw in raw_tenants.items()})


def load_quota_file(path: str, tenants: Iterable[str]) -> QuotaTable:
    """`parse_quotas` of a JSON file ('' = no quotas)."""
    if not path:
        return QuotaTable()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise QuotaConfigError(f"cannot read --quota-file {path!r}: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QuotaConfigError(f"--quota-file {path!r} is not JSON: {exc}") from exc
    return parse_quotas(doc, tenants, f"--quota-file {path!r}")
