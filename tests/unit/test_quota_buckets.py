"""Unit tier: the quota scripts (gateway/quota_store.py) against a real redis-server, with the clock
given by the test (the scripts take `now_ms` from the gateway), and the quota file's rules.

Token buckets: a full bucket passes a minute's allowance at once, refuses the next with the exact wait
until one unit has refilled, and refills continuously; refunds never overfill it; debt is waited out.
Calls in progress are leases that end at their deadline. The sessions ledger counts live sessions and
their bytes, forgets expired ones, and is exact under concurrent use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.core import ChatError, ErrorKind, RequestContext
from gateway.quota_config import NO_QUOTA, Quota, QuotaConfigError, load_quota_file, parse_quotas
from gateway.quota_store import NEVER, QuotaStore, quota_keys
from gateway.quotas import TenantQuotas
from gateway.redis_connect import redis_client

T0 = 1_800_000_000_000  # ms


def with_store(redis_url: str, body: Callable[[QuotaStore, Any], Awaitable[Any]]) -> Any:
    async def main():
        client = redis_client(redis_url, timeout_s=2.0)
        try:
            return await body(QuotaStore(client), client)
        finally:
            await client.aclose()

    return asyncio.run(main())


async def admit(store: QuotaStore, now: int, n: int = 1, *, rpm: int | None = None, tpm: int | None = None,
                tokens: int = 1, concurrent: int | None = None, lease_ms: int = 60_000, tenant: str = "alice",
                ids: list[str] | None = None):
    ids = ids or [f"call-{now}-{i}" for i in range(n)]
    return await store.admit(tenant, now, call_ids=ids, requests_per_minute=rpm, tokens_per_minute=tpm,
                             tokens=tokens, concurrent=concurrent, lease_end_ms=now + lease_ms)


# ---------------------------------------------------------------------------------------------- buckets


def test_a_full_bucket_passes_a_minute_of_requests_then_refuses_with_the_wait(redis_url) -> None:
    async def body(store, _client):
        passed = [await admit(store, T0, rpm=6) for _ in range(6)]
        seventh = await admit(store, T0, rpm=6)
        other = await admit(store, T0, rpm=6, tenant="bob")  # another tenant's bucket is its own
        almost = await admit(store, T0 + 5_000, rpm=6)  # one request refills in 10 s: half way
        refilled = await admit(store, T0 + 10_000, rpm=6)
        again = await admit(store, T0 + 10_000, rpm=6)
        return passed, seventh, other, almost, refilled, again

    passed, seventh, other, almost, refilled, again = with_store(redis_url, body)
    assert passed == [(True, "", 0)] * 6
    assert seventh == (False, "requests_per_minute", 10_000)
    assert other == (True, "", 0)
    assert almost == (False, "requests_per_minute", 5_000)
    assert refilled == (True, "", 0)
    assert again == (False, "requests_per_minute", 10_000)


def test_the_bucket_never_holds_more_than_a_minute(redis_url) -> None:
    async def body(store, _client):
        await admit(store, T0, rpm=3)
        later = T0 + 3_600_000  # an hour idle: still only 3
        return [await admit(store, later, rpm=3) for _ in range(4)]

    assert [ok for ok, _, _ in with_store(redis_url, body)] == [True, True, True, False]


def test_several_calls_are_taken_together_or_not_at_all(redis_url) -> None:
    async def body(store, client):
        too_many = await admit(store, T0, 5, rpm=4)  # more than the bucket ever holds
        three = await admit(store, T0, 3, rpm=4)
        two = await admit(store, T0, 2, rpm=4)  # one left: refused, and the one stays
        one = await admit(store, T0, 1, rpm=4)
        return too_many, three, two, one

    too_many, three, two, one = with_store(redis_url, body)
    assert too_many == (False, "requests_per_minute", NEVER)
    assert three[0] and one[0]
    assert two == (False, "requests_per_minute", 15_000)


def test_tokens_are_reserved_then_refunded_and_debt_is_waited_out(redis_url) -> None:
    async def body(store, _client):
        first = await admit(store, T0, tpm=600, tokens=400, ids=["a"])
        refused = await admit(store, T0, tpm=600, tokens=400, ids=["b"])  # 200 left, 400 asked: wait 20 s
        await store.settle("alice", T0, "a", 600, 400 - 50)  # generated 50 of 400: 350 back
        after_refund = await admit(store, T0, tpm=600, tokens=400, ids=["c"])  # 550 left
        await store.settle("alice", T0, "c", 600, 400 - 1000)  # generated 1000: 600 beyond -> debt
        in_debt = await admit(store, T0, tpm=600, tokens=100, ids=["d"])  # level -450: 550 to go
        overfill = await store.settle("alice", T0 + 10 * 60_000, "d", 600, 10_000)  # refunds cap at 600
        full = await admit(store, T0 + 10 * 60_000, tpm=600, tokens=600, ids=["e"])
        empty = await admit(store, T0 + 10 * 60_000, tpm=600, tokens=1, ids=["f"])
        return first, refused, after_refund, in_debt, overfill, full, empty

    first, refused, after_refund, in_debt, _, full, empty = with_store(redis_url, body)
    assert first[0] and after_refund[0] and full[0]
    assert refused == (False, "tokens_per_minute", 20_000)
    assert in_debt == (False, "tokens_per_minute", 55_000)
    assert empty == (False, "tokens_per_minute", 100)


def test_a_clock_behind_the_last_update_refills_nothing(redis_url) -> None:
    async def body(store, _client):
        await admit(store, T0 + 5_000, rpm=2)
        await admit(store, T0 + 5_000, rpm=2)
        return await admit(store, T0, rpm=2)  # another replica, 5 s behind

    assert with_store(redis_url, body) == (False, "requests_per_minute", 30_000)


# ---------------------------------------------------------------------------------------------- calls in progress


def test_calls_in_progress_are_capped_and_freed_by_settle_or_by_their_deadline(redis_url) -> None:
    async def body(store, _client):
        a = await admit(store, T0, concurrent=2, ids=["a"], lease_ms=5_000)
        b = await admit(store, T0, concurrent=2, ids=["b"], lease_ms=60_000)
        c = await admit(store, T0, concurrent=2, ids=["c"])
        await store.settle("alice", T0, "b", None, 0)
        d = await admit(store, T0, concurrent=2, ids=["d"], lease_ms=60_000)
        e = await admit(store, T0 + 1_000, concurrent=2, ids=["e"])
        f = await admit(store, T0 + 5_000, concurrent=2, ids=["f"])  # a's lease ended (its gateway died)
        batch = await admit(store, T0 + 5_000, 3, concurrent=2)
        return a, b, c, d, e, f, batch

    a, b, c, d, e, f, batch = with_store(redis_url, body)
    assert a[0] and b[0] and d[0] and f[0]
    assert c == (False, "concurrent_requests", 1000) and e == c
    assert batch == (False, "concurrent_requests", NEVER)


def test_keys_name_no_tenant(redis_url) -> None:
    async def body(store, client):
        await admit(store, T0, rpm=5, concurrent=5, tenant="alice")
        return [k.decode() for k in await client.keys("ivl:quota:*")]

    keys = with_store(redis_url, body)
    assert sorted(keys) == sorted([quota_keys("alice")["rate"], quota_keys("alice")["calls"]])
    assert not any("alice" in k for k in keys)


# ---------------------------------------------------------------------------------------------- sessions ledger


def test_the_ledger_counts_live_sessions_and_bytes_and_forgets_expired_ones(redis_url) -> None:
    async def body(store, _client):
        out = {}
        out["s1"] = await store.open_session("alice", T0, "s1", T0 + 1_000, 100, 2, 1_000)
        out["s2"] = await store.open_session("alice", T0, "s2", T0 + 60_000, 200, 2, 1_000)
        out["s3"] = await store.open_session("alice", T0, "s3", T0 + 60_000, 0, 2, 1_000)
        out["charge_over"] = await store.charge_session("alice", T0, "s2", T0 + 60_000, 701, 1_000)
        out["charge_exact"] = await store.charge_session("alice", T0, "s2", T0 + 60_000, 700, 1_000)
        out["bob"] = await store.open_session("bob", T0, "s9", T0 + 60_000, 1_000, 2, 1_000)
        # s1 expired: its slot and its 100 bytes are free again.
        out["after_expiry"] = await store.usage("alice", T0 + 1_000)
        out["s4"] = await store.open_session("alice", T0 + 1_000, "s4", T0 + 60_000, 100, 2, 1_000)
        out["closed"] = await store.close_session("alice", T0 + 1_000, "s2")
        out["close_again"] = await store.close_session("alice", T0 + 1_000, "s2")
        # A read moves s4's expiry with its TTL: it outlives its first expiry.
        await store.touch_session("alice", T0 + 50_000, "s4", T0 + 110_000)
        out["touched"] = await store.usage("alice", T0 + 100_000)
        out["all_gone"] = await store.usage("alice", T0 + 110_000)
        return out

    out = with_store(redis_url, body)
    assert out["s1"] == (True, "", 100) and out["s2"] == (True, "", 300)
    assert out["s3"] == (False, "live_sessions", 2)
    assert out["charge_over"] == (False, 300) and out["charge_exact"] == (True, 1_000)
    assert out["bob"] == (True, "", 1_000)
    assert out["after_expiry"] == (1, 900)
    assert out["s4"] == (True, "", 1_000)
    assert out["closed"] == (1, 100) and out["close_again"] == (1, 100)
    assert out["touched"] == (1, 100) and out["all_gone"] == (0, 0)


def test_empty_sessions_open_close_and_expire(redis_url) -> None:
    async def body(store, _client):
        await store.open_session("alice", T0, "e1", T0 + 1_000, 0, None, 100)
        await store.open_session("alice", T0, "e2", T0 + 60_000, 0, None, 100)
        return await store.close_session("alice", T0, "e2"), await store.usage("alice", T0 + 1_000)

    assert with_store(redis_url, body) == ((1, 0), (0, 0))


def test_the_ledger_is_exact_under_concurrent_opens(redis_url) -> None:
    async def body(store, _client):
        results = await asyncio.gather(*(store.open_session("alice", T0, f"s{i}", T0 + 60_000, 10, 7, None)
                                         for i in range(40)))
        return [ok for ok, _, _ in results], await store.usage("alice", T0)

    oks, usage = with_store(redis_url, body)
    assert sum(oks) == 7 and usage == (7, 70)


# ---------------------------------------------------------------------------------------------- TenantQuotas


def quotas_for(store: QuotaStore, table, clock: list[int]) -> TenantQuotas:
    return TenantQuotas(table, store, default_max_new_tokens=1024, default_ttl_s=3600, max_ttl_s=86_400,
                        tenants=["alice", "bob"], clock_ms=lambda: clock[0])


def test_refusals_are_quota_errors_with_the_wait_and_tickets_refund(redis_url) -> None:
    table = parse_quotas({"default": {"requests_per_minute": 2, "tokens_per_minute": 100}}, ["alice", "bob"])

    async def body(store, _client):
        clock = [T0]
        quotas = quotas_for(store, table, clock)
        ctx = RequestContext(timeout_s=30, tenant="alice")
        first = await quotas.admit(ctx, [0])  # 0 = the default 1024, lowered to the whole minute (100)
        first.close()  # never used: all 100 back
        await quotas.drain()
        second = await quotas.admit(ctx, [40])  # would be refused had the 100 not come back
        second.tickets[0].finish(10)  # 30 back
        errors = []
        for call in (lambda: quotas.admit(ctx, [1]), lambda: quotas.admit(RequestContext(30, tenant="bob"), [1, 1, 1])):
            with pytest.raises(ChatError) as err:
                await call()
            errors.append(err.value)
        second.close()
        await quotas.drain()
        return first.tickets[0].reserved, errors, quotas.stats

    reserved, (over, batch), stats = with_store(redis_url, body)
    assert reserved == 100
    assert over.kind is ErrorKind.QUOTA_EXCEEDED and over.retry_after_ms == 30_000
    assert "2 requests per minute" in over.message and "alice" in over.message
    assert batch.kind is ErrorKind.QUOTA_EXCEEDED and batch.retry_after_ms is None
    assert stats["alice"].refused == {"requests_per_minute": 1} and stats["bob"].refused == {"requests_per_minute": 3}
    assert stats["alice"].in_flight == 0 and stats["alice"].generated_tokens == 10


def test_session_ttl_is_lowered_to_the_operators_and_the_tenants_maximum(redis_url) -> None:
    table = parse_quotas({"tenants": {"bob": {"max_session_ttl_s": 600}}}, ["alice", "bob"])

    async def body(store, _client):
        quotas = quotas_for(store, table, [T0])
        with pytest.raises(ChatError) as err:
            quotas.session_ttl("alice", -1)
        return ([quotas.session_ttl(t, ask) for t in ("alice", "bob") for ask in (None, 0, 60, 10**9)],
                err.value.kind)

    ttls, kind = with_store(redis_url, body)
    assert ttls == [3600, 3600, 60, 86_400, 600, 600, 60, 600]
    assert kind is ErrorKind.INVALID_ARGUMENT


# ---------------------------------------------------------------------------------------------- the quota file


def test_tenant_entries_override_the_default_field_by_field(tmp_path) -> None:
    path = tmp_path / "quotas.json"
    path.write_text(json.dumps({"default": {"requests_per_minute": 60, "live_sessions": 10},
                                "tenants": {"bob": {"requests_per_minute": "unlimited", "session_bytes": 0}}}))
    table = load_quota_file(str(path), ["alice", "bob", "key-1234abcd"])
    assert table.of("alice") == Quota(requests_per_minute=60, live_sessions=10)
    assert table.of("bob") == Quota(requests_per_minute=None, live_sessions=10, session_bytes=0)
    assert table.of("key-1234abcd") == table.default
    assert load_quota_file("", ["alice"]).of("alice") == NO_QUOTA


@pytest.mark.parametrize(("doc", "words"), [
    ({"tenants": {"mallory": {}}}, ["no API key is named mallory", "alice"]),
    ({"default": {"requests_per_min": 5}}, ["unknown field", "requests_per_min"]),
    ({"default": {"requests_per_minute": -1}}, ["requests_per_minute", ">= 0"]),
    ({"default": {"requests_per_minute": 1.5}}, ["requests_per_minute"]),
    ({"default": {"max_session_ttl_s": 0}}, ["max_session_ttl_s", ">= 1"]),
    ({"limits": {}}, ["unknown top-level", "limits"]),
    ([], ["JSON object"]),
])
def test_a_bad_quota_file_is_refused_naming_what_to_fix(doc, words) -> None:
    with pytest.raises(QuotaConfigError) as err:
        parse_quotas(doc, ["alice"])
    for word in words:
        assert word in str(err.value)


def test_an_unreadable_or_malformed_quota_file_is_named(tmp_path) -> None:
    with pytest.raises(QuotaConfigError, match="cannot read --quota-file"):
        load_quota_file(str(tmp_path / "missing.json"), ["alice"])
    bad = tmp_path / "bad.json"
    bad.write_text("{default: 1}")
    with pytest.raises(QuotaConfigError, match="is not JSON"):
        load_quota_file(str(bad), ["alice"])


# ---------------------------------------------------------------------------------------------- metered calls


def test_a_call_is_charged_what_it_generated_or_all_it_reserved_once_output_was_seen(redis_url) -> None:
    """erin: 1000 tokens a minute, the clock stopped (no refill): the bucket's level after each call
    shows what the call was charged."""
    from gateway.core import ChatEvent, TurnEnd, Usage

    table = parse_quotas({"tenants": {"alice": {"tokens_per_minute": 1000}}}, ["alice", "bob"])

    async def finished(used: int):
        yield ChatEvent("a")
        yield ChatEvent("b", TurnEnd("stop", Usage(completion_tokens=used)))

    async def fails_after_output():
        yield ChatEvent("a")
        raise ChatError(ErrorKind.UNAVAILABLE, "decoder went away")

    async def fails_before_output():
        raise ChatError(ErrorKind.UNAVAILABLE, "decoder down")
        yield  # pragma: no cover - makes this an async generator

    async def body(store, client):
        quotas = quotas_for(store, table, [T0])
        ctx = RequestContext(timeout_s=30, tenant="alice")
        levels = []

        async def level() -> float:
            await quotas.drain()
            return float(await client.hget(quota_keys("alice")["rate"], "tok"))

        async def run(events, max_new_tokens: int = 100) -> None:
            with contextlib.suppress(ChatError):
                async for _ in quotas.metered(ctx, max_new_tokens, events):
                    pass
            levels.append(await level())

        await run(finished(30))  # 100 reserved, 30 used: 70 back
        await run(fails_after_output())  # keeps all 100
        await run(fails_before_output())  # all 100 back
        stream = quotas.metered(ctx, 100, finished(30))
        await anext(stream)
        await stream.aclose()  # the caller went away mid-stream: keeps all 100
        levels.append(await level())
        return levels, quotas.stats["alice"]

    levels, stats = with_store(redis_url, body)
    assert levels == [970.0, 870.0, 870.0, 770.0]
    assert stats.in_flight == 0 and stats.admitted == 4


def test_the_shipped_example_quota_file_is_valid() -> None:
    from tests.integration.procs import REPO_ROOT

    table = load_quota_file(str(REPO_ROOT / "deploy" / "quotas.example.json"), ["example-team", "other"])
    assert table.of("example-team").concurrent_requests == 8
    assert table.of("other") == table.default and table.default.limits_calls and table.default.limits_sessions


def test_the_gateway_refuses_to_start_with_a_quota_for_no_key(tmp_path, capsys) -> None:
    from gateway.config import GatewayConfig

    path = tmp_path / "quotas.json"
    path.write_text(json.dumps({"tenants": {"alice": {"requests_per_minute": 5}}}))
    with pytest.raises(SystemExit) as exit_:
        GatewayConfig.from_args(["--insecure-open", "--quota-file", str(path)], env={})
    assert exit_.value.code == 2 and "no API key is named alice" in capsys.readouterr().err
    open_table = json.dumps({"tenants": {"anonymous": {"requests_per_minute": 5}}})
    path.write_text(open_table)  # an open gateway's one tenant
    config = GatewayConfig.from_args(["--insecure-open", "--quota-file", str(path)], env={})
    assert config.quotas.of("anonymous").requests_per_minute == 5
    assert "quotas=on" in config.summary() and "tenants=anonymous" in config.summary()
