"""Tenants' quota state in the session Redis, shared by every gateway replica (Lua scripts: each
check-and-take is atomic, whichever replica runs it).

Keys of one tenant share a hash tag (its owner hash, never its name), so Redis Cluster keeps them on
one slot and one script may touch them all:
  ivl:quota:v1:{<tag>}:rate      HASH  token buckets: `req`, `tok` (levels) and `req_at`, `tok_at` (ms)
  ivl:quota:v1:{<tag>}:calls     ZSET  chat call id -> lease end (ms): calls in progress
  ivl:quota:v1:{<tag>}:sessions  ZSET  session id -> expiry (ms): the tenant's live sessions
  ivl:quota:v1:{<tag>}:bytes     HASH  session id -> bytes charged, and `#total`

Token buckets hold up to one minute's allowance and refill continuously (allowance / 60,000 per ms):
a full bucket lets a burst of a minute's worth through, then calls pass at the steady rate. The
gateway passes its clock (`now_ms`); replicas should run NTP (a skew of a second shifts a refill by a
second, nothing more). A call's lease ends at its deadline, so a replica that dies mid-call frees its
slots at the latest when those calls' deadlines pass. A session's ledger entry carries the session's
expiry and is refreshed whenever the session's own TTL is (every read and append): expired sessions
leave the count, and their bytes the total, the next time the tenant's ledger is used.
"""

from __future__ import annotations

import hashlib

import redis.asyncio as aioredis

KEY_PREFIX = "ivl:quota:v1:"
MINUTE_MS = 60_000
UNLIMITED = -1  # a cap the scripts never check
NEVER = -1  # wait_ms of a request that cannot pass at any time (bigger than the whole quota)


def tenant_tag(tenant: str) -> str:
    """What the keys hold of a tenant: a hash, not its name."""
    return hashlib.sha256(f"ivl-quota-tenant:{tenant}".encode()).hexdigest()[:32]


def quota_keys(tenant: str) -> dict[str, str]:
    base = f"{KEY_PREFIX}{{{tenant_tag(tenant)}}}"
    return {name: f"{base}:{name}" for name in ("rate", "calls", "sessions", "bytes")}


# A bucket's level now: refilled since its last update, never above its cap (a negative level is debt:
# tokens generated beyond what was reserved). A clock behind the last update refills nothing.
_BUCKET_LUA = """
local function level(key, name, cap, now)
  local l = tonumber(redis.call('HGET', key, name) or cap)
  local at = tonumber(redis.call('HGET', key, name .. '_at') or now)
  if now > at then l = math.min(cap, l + (now - at) * cap / 60000) end
  return l, math.max(at, now)
end
local function wait_ms(l, cost, cap)
  if cost > cap then return -1 end
  return math.ceil((cost - l) * 60000 / cap)
end
"""

# KEYS: rate, calls. ARGV: now_ms, requests cap, tokens cap, tokens to reserve, concurrency cap,
# lease end (ms), then one id per call admitted together. Caps < 0 are unlimited.
# Returns {1} when admitted (everything taken), else {0, quota, wait_ms} and nothing taken.
_ADMIT_LUA = _BUCKET_LUA + """
local now = tonumber(ARGV[1])
local req_cap, tok_cap, tok_cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local conc_cap, lease_end = tonumber(ARGV[5]), tonumber(ARGV[6])
local n = #ARGV - 6
if conc_cap >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) + n > conc_cap then
    return {0, 'concurrent_requests', n > conc_cap and -1 or 1000}
  end
end
local req_l, req_at, tok_l, tok_at
if req_cap >= 0 then
  req_l, req_at = level(KEYS[1], 'req', req_cap, now)
  if req_l < n then return {0, 'requests_per_minute', wait_ms(req_l, n, req_cap)} end
end
if tok_cap >= 0 then
  tok_l, tok_at = level(KEYS[1], 'tok', tok_cap, now)
  if tok_l < tok_cost then return {0, 'tokens_per_minute', wait_ms(tok_l, tok_cost, tok_cap)} end
end
if req_cap >= 0 then redis.call('HSET', KEYS[1], 'req', tostring(req_l - n), 'req_at', tostring(req_at)) end
if tok_cap >= 0 then redis.call('HSET', KEYS[1], 'tok', tostring(tok_l - tok_cost), 'tok_at', tostring(tok_at)) end
if req_cap >= 0 or tok_cap >= 0 then redis.call('PEXPIRE', KEYS[1], 3600000) end
if conc_cap >= 0 then
  for i = 7, #ARGV do redis.call('ZADD', KEYS[2], lease_end, ARGV[i]) end
  if redis.call('PTTL', KEYS[2]) < lease_end - now then redis.call('PEXPIRE', KEYS[2], lease_end - now + 1000) end
end
return {1}
"""

# A call ended: its slot freed, its unused tokens given back (a negative refund charges tokens
# generated beyond the reservation). KEYS: rate, calls. ARGV: now_ms, call id, tokens cap, refund.
_SETTLE_LUA = _BUCKET_LUA + """
redis.call('ZREM', KEYS[2], ARGV[2])
local cap, refund = tonumber(ARGV[3]), tonumber(ARGV[4])
if cap >= 0 and refund ~= 0 then
  local l, at = level(KEYS[1], 'tok', cap, tonumber(ARGV[1]))
  redis.call('HSET', KEYS[1], 'tok', tostring(math.min(cap, l + refund)), 'tok_at', tostring(at))
  redis.call('PEXPIRE', KEYS[1], 3600000)
end
return 1
"""

# The sessions ledger: expired sessions leave it first; every write keeps the keys alive as long as
# the longest-lived session. KEYS: sessions, bytes.
_LEDGER_LUA = """
local function purge(now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  for _, sid in ipairs(gone) do
    local b = tonumber(redis.call('HGET', KEYS[2], sid) or '0')
    redis.call('HDEL', KEYS[2], sid)
    redis.call('HINCRBY', KEYS[2], '#total', 0 - b)  -- not -b: Lua's -0 reads "-0", no integer
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
end
local function total() return tonumber(redis.call('HGET', KEYS[2], '#total') or '0') end
local function keep(now)
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if #last == 0 then redis.call('DEL', KEYS[1], KEYS[2]) return end
  local ms = math.max(1, tonumber(last[2]) - now + 1000)
  redis.call('PEXPIRE', KEYS[1], ms)
  redis.call('PEXPIRE', KEYS[2], ms)
end
local now = tonumber(ARGV[1])
purge(now)
"""

# A new session. ARGV: now_ms, session id, expiry ms, bytes, live sessions cap, bytes cap.
# Returns {1, total} or {0, quota, current} with nothing changed.
_OPEN_LUA = _LEDGER_LUA + """
local sessions_cap, bytes_cap, b = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[4])
local live = redis.call('ZCARD', KEYS[1])
if sessions_cap >= 0 and live >= sessions_cap then return {0, 'live_sessions', live} end
if bytes_cap >= 0 and total() + b > bytes_cap then return {0, 'session_bytes', total()} end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[2], b)
redis.call('HINCRBY', KEYS[2], '#total', b)
keep(now)
return {1, total()}
"""

# Bytes added to (or, negative, taken from) a session; its expiry refreshed. A session the ledger
# does not hold (stored before quotas were on) is counted from now. ARGV: now_ms, session id,
# expiry ms, delta, bytes cap. Returns {1, total} or {0, 'session_bytes', total}.
_CHARGE_LUA = _LEDGER_LUA + """
local bytes_cap, delta = tonumber(ARGV[5]), tonumber(ARGV[4])
if delta > 0 and bytes_cap >= 0 and total() + delta > bytes_cap then return {0, 'session_bytes', total()} end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[2], delta)
redis.call('HINCRBY', KEYS[2], '#total', delta)
keep(now)
return {1, total()}
"""

# A session was read: its expiry moves with its TTL (only if the ledger holds it). ARGV: now_ms,
# session id, expiry ms. Returns {live sessions, total bytes}.
_TOUCH_LUA = _LEDGER_LUA + """
if ARGV[2] ~= '' and redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[3], ARGV[2]) > 0 then keep(now) end
return {redis.call('ZCARD', KEYS[1]), total()}
"""

# A session deleted. ARGV: now_ms, session id. Returns {live sessions, total bytes}.
_CLOSE_LUA = _LEDGER_LUA + """
if redis.call('ZREM', KEYS[1], ARGV[2]) > 0 then
  local b = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('HINCRBY', KEYS[2], '#total', 0 - b)  -- not -b: Lua's -0 reads "-0", no integer
  keep(now)
end
return {redis.call('ZCARD', KEYS[1]), total()}
"""


def _cap(limit: int | None) -> int:
    return UNLIMITED if limit is None else limit


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class QuotaStore:
    """The scripts above, one method each. Redis errors propagate (the caller decides what they mean)."""

    def __init__(self, client: aioredis.Redis):
        self._redis = client
        self._admit = client.register_script(_ADMIT_LUA)
        self._settle = client.register_script(_SETTLE_LUA)
        self._open = client.register_script(_OPEN_LUA)
        self._charge = client.register_script(_CHARGE_LUA)
        self._touch = client.register_script(_TOUCH_LUA)
        self._close = client.register_script(_CLOSE_LUA)

    async def admit(self, tenant: str, now_ms: int, *, call_ids: list[str], requests_per_minute: int | None,
                    tokens_per_minute: int | None, tokens: int, concurrent: int | None,
                    lease_end_ms: int) -> tuple[bool, str, int]:
        """(admitted, the quota that refused, ms to wait: NEVER when it cannot pass at any time)."""
        k = quota_keys(tenant)
        args = [now_ms, _cap(requests_per_minute), _cap(tokens_per_minute), tokens, _cap(concurrent),
                lease_end_ms, *call_ids]
        reply = await self._admit(keys=[k["rate"], k["calls"]], args=args)
        if int(reply[0]) == 1:
            return True, "", 0
        return False, _text(reply[1]), int(reply[2])

    async def settle(self, tenant: str, now_ms: int, call_id: str, tokens_per_minute: int | None,
                     refund: int) -> None:
        k = quota_keys(tenant)
        await self._settle(keys=[k["rate"], k["calls"]], args=[now_ms, call_id, _cap(tokens_per_minute), refund])

    async def open_session(self, tenant: str, now_ms: int, session_id: str, expires_ms: int, size: int,
                           live_sessions: int | None, session_bytes: int | None) -> tuple[bool, str, int]:
        """(opened, the quota that refused, its current use)."""
        k = quota_keys(tenant)
        reply = await self._open(keys=[k["sessions"], k["bytes"]],
                                 args=[now_ms, session_id, expires_ms, size, _cap(live_sessions),
                                       _cap(session_bytes)])
        if int(reply[0]) == 1:
            return True, "", int(reply[1])
        return False, _text(reply[1]), int(reply[2])

    async def charge_session(self, tenant: str, now_ms: int, session_id: str, expires_ms: int, delta: int,
                             session_bytes: int | None) -> tuple[bool, int]:
        """(charged, the tenant's total bytes)."""
        k = quota_keys(tenant)
        reply = await self._charge(keys=[k["sessions"], k["bytes"]],
                                   args=[now_ms, session_id, expires_ms, delta, _cap(session_bytes)])
        return int(reply[0]) == 1, int(reply[-1])

    async def touch_session(self, tenant: str, now_ms: int, session_id: str, expires_ms: int) -> tuple[int, int]:
        """(live sessions, total bytes) after moving the session's expiry."""
        k = quota_keys(tenant)
        live, total = await self._touch(keys=[k["sessions"], k["bytes"]], args=[now_ms, session_id, expires_ms])
        return int(live), int(total)

    async def usage(self, tenant: str, now_ms: int) -> tuple[int, int]:
        """(live sessions, total bytes)."""
        return await self.touch_session(tenant, now_ms, "", 0)

    async def close_session(self, tenant: str, now_ms: int, session_id: str) -> tuple[int, int]:
        k = quota_keys(tenant)
        live, total = await self._close(keys=[k["sessions"], k["bytes"]], args=[now_ms, session_id])
        return int(live), int(total)
