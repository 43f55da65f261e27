"""A spy on the constant-time comparison the API-key check must use (hmac.compare_digest).

It replaces `hmac` as services/common/security.py sees it (no other module is affected), records every
pair compared and still answers with the real comparison. A check that compares keys with `==` records
nothing, which the tests assert against.
"""

from __future__ import annotations

import hmac
from types import SimpleNamespace

import pytest

from services.common import security


class CompareDigestSpy:
    def __init__(self) -> None:
        self.pairs: list[tuple[bytes, bytes]] = []

    def __call__(self, a, b) -> bool:
        self.pairs.append((a, b))
        return hmac.compare_digest(a, b)


def spy_on_compare_digest(monkeypatch: pytest.MonkeyPatch) -> CompareDigestSpy:
    spy = CompareDigestSpy()
    monkeypatch.setattr(security, "hmac", SimpleNamespace(compare_digest=spy))
    return spy
