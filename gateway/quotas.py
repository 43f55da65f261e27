"""Per-tenant quotas, applied around the turn core (gateway/core.py): what a tenant may start, and
what its sessions may hold. Limits come from `--quota-file` (gateway/quota_config.py); the state is
in the session Redis, shared by all gateway replicas (gateway/quota_store.py).

Chat calls: each call (a ChatStream, a Chat, each BatchChat item, each HTTP choice) takes one request
from the tenant's requests-per-minute bucket, one slot of its concurrent calls, and reserves its
`max_new_tokens` (the gateway's --max-new-tokens when the request leaves it 0) from its
tokens-per-minute bucket, all at once, before any work. At the end the unused part of the
reservation is given back. Reserving up front rather than charging tokens as they come means an
over-quota call is refused before it costs an encode, and a tenant's calls in progress can never
generate more than its bucket held when they started. A reservation larger than a whole minute's
allowance is lowered to it (such a call can run with a full bucket; what it generates beyond goes
into debt that later calls wait out). A call that fails or is cancelled after its first output keeps
its whole reservation (a cancelled stream is no way around the quota); one that fails before any
output gets it all back. Calls admitted together (a BatchChat, an HTTP request with n > 1) are
admitted or refused as a whole.

Sessions: creating one takes a live-session slot and charges its system message's bytes; each stored
turn charges its text and new media bytes; deleting or expiry frees both. A requested TTL beyond the
tenant's `max_session_ttl_s` is lowered to it (the reply's `expires_at_unix` shows what was granted).

Over quota is ErrorKind.QUOTA_EXCEEDED (gRPC RESOURCE_EXHAUSTED with `retry-after-ms` trailing
metadata; HTTP 429 with Retry-After) when waiting helps; live sessions and session bytes say what
to delete instead. If the session Redis cannot be reached, chat calls are admitted without their
quotas (logged, counted in ivl_gateway_quota_store_errors_total); session calls fail as they would
anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from gateway.core import ChatError, ChatEvent, ErrorKind, RequestContext, session_error
from gateway.quota_config import Quota, QuotaTable
from gateway.quota_store import NEVER, QuotaStore
from gateway.sessions import classify_error

log = logging.getLogger(__name__)

STORE_TIMEOUT_S = 2.0
STORE_ERROR_LOG_EVERY_S = 30.0  # a Redis outage logs a warning this often, not once per call
LEASE_SLACK_S = 5.0  # a call's slot outlives its deadline by this much if its gateway dies

_WHAT = {
    "requests_per_minute": "requests per minute",
    "tokens_per_minute": "generated tokens per minute",
    "concurrent_requests": "chat calls in progress",
    "live_sessions": "live sessions",
    "session_bytes": "bytes stored in sessions",
}


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class TenantStats:
    """What this replica saw of one tenant (for metrics)."""

    admitted: int = 0
    in_flight: int = 0
    generated_tokens: int = 0
    refused: Counter = field(default_factory=Counter)  # quota name -> calls refused


class Ticket:
    """One admitted chat call: its slot and token reservation until `finish`."""

    def __init__(self, quotas: TenantQuotas, tenant: str, call_id: str, reserved: int, stored: bool):
        self._quotas, self.tenant, self.call_id, self.reserved = quotas, tenant, call_id, reserved
        self._stored = stored  # False: nothing was taken in Redis (no quota, or the store was down)
        self.finished = False

    def finish(self, generated: int) -> asyncio.Task | None:
        """Free the slot and give back `reserved - generated` tokens, in a task (this runs where the call
        ends, cancellation included); the task, or None when there is nothing to wait for."""
        if self.finished:
            return None
        self.finished = True
        return self._quotas._finished(self, generated)


class Admission:
    """Tickets of calls admitted together; `close` finishes those never used (nothing generated)."""

    def __init__(self, tickets: list[Ticket]):
        self.tickets = tickets

    def close(self) -> None:
        for ticket in self.tickets:
            ticket.finish(0)


class TenantQuotas:
    def __init__(self, table: QuotaTable, store: QuotaStore, *, default_max_new_tokens: int,
                 default_ttl_s: int, max_ttl_s: int, tenants: Sequence[str] = (),
                 clock_ms: Callable[[], int] = _now_ms):
        self.table = table
        self.store = store
        self.default_max_new_tokens = default_max_new_tokens
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self._clock_ms = clock_ms
        # Metrics labels: the configured tenants only (bounded); created up front so they show as 0.
        self.stats: dict[str, TenantStats] = {name: TenantStats() for name in tenants}
        self.store_errors = 0
        self._last_store_warning = 0.0
        self._settling: set[asyncio.Task] = set()  # bounded by the calls in progress

    def _stats(self, tenant: str) -> TenantStats:
        return self.stats.setdefault(tenant, TenantStats())

    # ------------------------------------------------------------------ chat calls

    def reservation(self, max_new_tokens: int, quota: Quota) -> int:
        tokens = max_new_tokens or self.default_max_new_tokens
        if quota.tokens_per_minute:
            tokens = min(tokens, quota.tokens_per_minute)
        return max(1, tokens)

    async def admit(self, ctx: RequestContext, max_new_tokens: Sequence[int]) -> Admission:
        """Tickets for calls of `ctx.tenant` (one per `max_new_tokens`), or ChatError(QUOTA_EXCEEDED)."""
        tenant = ctx.tenant
        quota = self.table.of(tenant)
        stats = self._stats(tenant)
        reserved = [self.reservation(m, quota) for m in max_new_tokens]
        call_ids = [uuid.uuid4().hex for _ in reserved]
        stored = quota.limits_calls
        if stored:
            for name in ("concurrent_requests", "requests_per_minute", "tokens_per_minute"):
                if getattr(quota, name) == 0:
                    raise self._refusal(tenant, quota, name, NEVER, len(reserved))
            now = self._clock_ms()
            try:
                ok, name, wait_ms = await asyncio.wait_for(self.store.admit(
                    tenant, now, call_ids=call_ids, requests_per_minute=quota.requests_per_minute,
                    tokens_per_minute=quota.tokens_per_minute, tokens=sum(reserved),
                    concurrent=quota.concurrent_requests,
                    lease_end_ms=now + int((ctx.timeout_s + LEASE_SLACK_S) * 1000)), STORE_TIMEOUT_S)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                self._store_failed(exc)
                stored = False
            else:
                if not ok:
                    raise self._refusal(tenant, quota, name, wait_ms, len(reserved))
        stats.admitted += len(reserved)
        stats.in_flight += len(reserved)
        return Admission([Ticket(self, tenant, cid, r, stored) for cid, r in zip(call_ids, reserved, strict=True)])

    async def metered(self, ctx: RequestContext, max_new_tokens: int,
                      events: AsyncIterator[ChatEvent]) -> AsyncIterator[ChatEvent]:
        """`events` of one call, admitted first (unless `ctx.quota_ticket` holds its admission) and
        settled at the end with the tokens the decoder reported."""
        try:
            ticket = ctx.quota_ticket or (await self.admit(ctx, [max_new_tokens])).tickets[0]
        except BaseException:
            await events.aclose()
            raise
        generated = 0
        completed = False
        try:
            async for event in events:
                generated = ticket.reserved  # output seen: an unfinished call keeps its reservation
                if event.end is not None:
                    generated = event.end.usage.completion_tokens
                yield event
            completed = True
        finally:
            try:
                await events.aclose()  # stops the generation (if the caller went away) before the settlement
            finally:
                settling = ticket.finish(generated)
        if completed and settling is not None:
            await settling  # settled before the call's end reaches the client: its next call sees the refund

    def _finished(self, ticket: Ticket, generated: int) -> asyncio.Task | None:
        stats = self._stats(ticket.tenant)
        stats.in_flight -= 1
        stats.generated_tokens += generated
        if not ticket._stored:
            return None
        quota = self.table.of(ticket.tenant)
        # A task, not an await: a cancelled call ends here too, and must still give its slot back.
        task = asyncio.ensure_future(self._settle(ticket, quota, ticket.reserved - generated))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _settle(self, ticket: Ticket, quota: Quota, refund: int) -> None:
        try:
            await asyncio.wait_for(self.store.settle(ticket.tenant, self._clock_ms(), ticket.call_id,
                                                     quota.tokens_per_minute, refund), STORE_TIMEOUT_S)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._store_failed(exc)  # the slot's lease ends at the call's deadline anyway

    async def drain(self) -> None:
        """Wait for the settlements in the background (at shutdown, and in tests)."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)

    def _store_failed(self, exc: BaseException) -> None:
        self.store_errors += 1
        now = time.monotonic()
        if now - self._last_store_warning >= STORE_ERROR_LOG_EVERY_S:
            self._last_store_warning = now
            log.warning("quota store (the session Redis) failed: %s: %s; chat calls are admitted without their "
                        "quotas until it answers", type(exc).__name__, exc)

    def _refusal(self, tenant: str, quota: Quota, name: str, wait_ms: int, calls: int) -> ChatError:
        self._stats(tenant).refused[name] += calls
        limit = getattr(quota, name)
        what = f"tenant {tenant!r} is over its quota of {limit} {_WHAT[name]}"
        if wait_ms == NEVER:
            if name == "tokens_per_minute":
                hint = "these calls reserve more tokens than the quota allows in a minute: lower max_new_tokens or " \
                       "send fewer requests at once"
            elif limit == 0:
                hint = "its operator allows none"
            else:
                hint = f"send at most {limit} at once"
            return ChatError(ErrorKind.QUOTA_EXCEEDED, f"{what}: {hint}")
        return ChatError(ErrorKind.QUOTA_EXCEEDED, f"{what}: retry in {wait_ms / 1000:.1f} s",
                         retry_after_ms=max(1, wait_ms))

    # ------------------------------------------------------------------ sessions

    def session_ttl(self, tenant: str, requested_s: int | None) -> int:
        """The TTL a new session gets: the request's (None/0 = the default), lowered to the operator's
        maximum and the tenant's. ChatError(INVALID_ARGUMENT) for a negative one."""
        if requested_s is not None and requested_s < 0:
            raise ChatError(ErrorKind.INVALID_ARGUMENT, f"ttl must be positive (or 0 for the default "
                            f"{self.default_ttl_s} s), got {requested_s}", param="ttl_seconds")
        ttl = min(requested_s or self.default_ttl_s, self.max_ttl_s)
        tenant_max = self.table.of(tenant).max_session_ttl_s
        return ttl if tenant_max is None else min(ttl, tenant_max)

    async def open_session(self, tenant: str, session_id: str, ttl_s: int, size: int) -> None:
        """Count a new session (before it is stored), or ChatError(QUOTA_EXCEEDED)."""
        quota = self.table.of(tenant)
        if not quota.limits_sessions:
            return
        now = self._clock_ms()
        ok, name, used = await self._session_call(self.store.open_session(
            tenant, now, session_id, now + ttl_s * 1000, size, quota.live_sessions, quota.session_bytes))
        if not ok:
            self._stats(tenant).refused[name] += 1
            limit = getattr(quota, name)
            raise ChatError(ErrorKind.QUOTA_EXCEEDED, f"tenant {tenant!r} is over its quota of {limit} {_WHAT[name]} "
                                                      f"(now {used}): delete sessions it no longer needs, or wait "
                                                      "for some to expire")

    async def session_used(self, tenant: str, session_id: str, ttl_s: int, *, adding: bool) -> None:
        """A session was read (its TTL restarted): its ledger expiry follows. `adding` (a turn is about to
        be generated): ChatError(QUOTA_EXCEEDED) when the tenant's sessions are already full, before any
        work is done for a turn that could not be stored."""
        quota = self.table.of(tenant)
        if not quota.limits_sessions:
            return
        now = self._clock_ms()
        _live, total = await self._session_call(self.store.touch_session(tenant, now, session_id,
                                                                         now + ttl_s * 1000))
        if adding and quota.session_bytes is not None and total >= quota.session_bytes:
            self._stats(tenant).refused["session_bytes"] += 1
            raise ChatError(ErrorKind.QUOTA_EXCEEDED, f"tenant {tenant!r} is over its quota of {quota.session_bytes} "
                                                      f"{_WHAT['session_bytes']} (now {total}): delete sessions it no "
                                                      "longer needs")

    async def charge_session(self, tenant: str, session_id: str, ttl_s: int, delta: int) -> None:
        """Add `delta` bytes to a session (negative: give them back), or ChatError(QUOTA_EXCEEDED)."""
        quota = self.table.of(tenant)
        if not quota.limits_sessions or delta == 0:
            return
        now = self._clock_ms()
        ok, total = await self._session_call(self.store.charge_session(
            tenant, now, session_id, now + ttl_s * 1000, delta, quota.session_bytes))
        if not ok:
            self._stats(tenant).refused["session_bytes"] += 1
            raise ChatError(ErrorKind.QUOTA_EXCEEDED, f"tenant {tenant!r} is over its quota of {quota.session_bytes} "
                                                      f"{_WHAT['session_bytes']} (now {total}; this turn needs "
                                                      f"{delta} more): the turn was not stored; delete sessions it "
                                                      "no longer needs")

    async def close_session(self, tenant: str, session_id: str) -> None:
        if self.table.of(tenant).limits_sessions:
            await self._session_call(self.store.close_session(tenant, self._clock_ms(), session_id))

    async def _session_call(self, awaitable):
        """Session quota calls fail like the session calls they belong to (store down or full)."""
        try:
            return await asyncio.wait_for(awaitable, STORE_TIMEOUT_S)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise session_error(classify_error("session quota", exc)) from exc
