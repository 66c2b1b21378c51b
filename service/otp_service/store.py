"""Where codes and counters live: the Store interface and its Redis implementation.

Every rule that concurrent calls could race past is one Lua script, so it holds across any
number of replicas. A number's keys share the hash tag ``{+E164}``, so the scripts also run on
Redis Cluster. Redis keeps only keyed digests of codes, never a code. Time comes from Redis'
own clock (``TIME``), so replicas with skewed clocks still agree on expiry and cooldowns.

Keys for one number:
    otp:{+917003848501}:c   hash   <digest> -> expiry in ms (one field per live code),
                                   "n" -> verification attempts used since the last lockout;
                                   expires with the newest code.
    otp:{+917003848501}:s   zset   <digest> scored by send time in ms: the sends of the last hour.
    otp:{+917003848501}:f   list   times in ms of the latest wrong codes, newest first, at most
                                   the hourly failed-verify budget of them.

Send budgets shared by every number (one hash slot of their own, so a second round trip before
a send):
    otp:{senders}:caller:billing  list  times in ms of a calling service's latest sends, newest
                                        first, at most its per-minute budget of them.
    otp:{senders}:interakt        list  the same for the whole Interakt account, whose rate limit
                                        every replica shares.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from otp_service import metrics
from otp_service.errors import LimitExceeded, StoreUnavailable
from otp_service.pipelined_redis import PipelinedRedis
from otp_service.results import VerifyOutcome, VerifyResult

SEND_WINDOW_MS = 3_600_000
FAILED_VERIFY_WINDOW_MS = 3_600_000
SEND_BUDGET_WINDOW_MS = 60_000

# KEYS[1] codes hash, KEYS[2] sends zset, KEYS[3] wrong-code times list
# ARGV[1] digest of the new code, ARGV[2] ttl ms, ARGV[3] cooldown ms,
# ARGV[4] max sends per window, ARGV[5] window ms, ARGV[6] max attempts,
# ARGV[7] max wrong codes per failed-verify window, ARGV[8] that window in ms
# Returns {0, expiry ms, wait ms until the next send} when the code is stored, {1, wait ms} in
# the cooldown, {2, wait ms} over the hourly cap, {3, wait ms} while the number is over its
# wrong-code budget (no code could verify before then, so sending one would only cost money).
_SEND_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local failed = redis.call('LINDEX', KEYS[3], tonumber(ARGV[7]) - 1)
if failed and tonumber(failed) > now - tonumber(ARGV[8]) then
  return {3, tonumber(failed) + tonumber(ARGV[8]) - now}
end
local ttl, cooldown = tonumber(ARGV[2]), tonumber(ARGV[3])
local cap, window = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if last[2] and now < tonumber(last[2]) + cooldown then
  return {1, tonumber(last[2]) + cooldown - now}
end
if redis.call('ZCARD', KEYS[2]) >= cap then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {2, tonumber(oldest[2]) + window - now}
end
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('PEXPIRE', KEYS[2], window)
-- A locked number gets a fresh budget only with a new code; a resend to an unlocked number
-- keeps the attempts already used, so resending cannot extend guessing.
if tonumber(redis.call('HGET', KEYS[1], 'n') or '0') >= tonumber(ARGV[6]) then
  redis.call('DEL', KEYS[1])
end
-- Earlier codes stay valid until their own expiry (WhatsApp can deliver late, and users type
-- the first code they see); expired ones are dropped so the hash stays small.
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if fields[i] ~= 'n' and tonumber(fields[i + 1]) <= now then
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
redis.call('HSET', KEYS[1], ARGV[1], now + ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
-- The caller is told when a resend will be accepted: after the cooldown, or after the hour
-- when this send used up the cap.
local wait = cooldown
if redis.call('ZCARD', KEYS[2]) >= cap then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  wait = math.max(wait, tonumber(oldest[2]) + window - now)
end
return {0, now + ttl, wait}
"""

# KEYS[1] codes hash, KEYS[2] sends zset
# ARGV[1] digest of a code the provider did not accept
# Returns 1. Removes the code and gives the send back, so a failed delivery leaves no usable
# code and does not hold the user in the cooldown.
_CANCEL_SCRIPT = """
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 1 end
local newest = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if fields[i] ~= 'n' then newest = math.max(newest, tonumber(fields[i + 1])) end
end
if newest == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIREAT', KEYS[1], newest)
end
return 1
"""

# KEYS[1] codes hash, KEYS[2] wrong-code times list
# ARGV[1] digest of the typed code, ARGV[2] max attempts, ARGV[3] max wrong codes per window,
# ARGV[4] window ms
# Returns {outcome, n}: 1 verified, 2 wrong code (n = attempts remaining), 3 no active code,
# 4 too many attempts, 5 too many wrong codes in the window (n = ms until the oldest counted one
# leaves it).
# The attempt is counted before the comparison, so concurrent guesses cannot slip past the
# budget; a match deletes every code of the number, so of concurrent correct calls one wins.
# The hourly budget is checked first: once spent, even the right code is refused, so resending
# (which refills the per-code budget) cannot buy more guesses.
_VERIFY_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap, window = tonumber(ARGV[3]), tonumber(ARGV[4])
local oldest = redis.call('LINDEX', KEYS[2], cap - 1)
if oldest and tonumber(oldest) > now - window then
  return {5, tonumber(oldest) + window - now}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {3, 0} end
local max = tonumber(ARGV[2])
local used = redis.call('HINCRBY', KEYS[1], 'n', 1)
if used > max then return {4, 0} end
local expires = redis.call('HGET', KEYS[1], ARGV[1])
if expires and tonumber(expires) > now then
  redis.call('DEL', KEYS[1])
  return {1, 0}
end
redis.call('LPUSH', KEYS[2], now)
redis.call('LTRIM', KEYS[2], 0, cap - 1)
redis.call('PEXPIRE', KEYS[2], window)
return {2, max - used}
"""

# KEYS[1] the caller's send times list, KEYS[2] the Interakt account's send times list
# ARGV[1] the caller's max sends per window, ARGV[2] the account's, ARGV[3] window ms
# Returns {0, time ms it counted} when the send is counted in both, {1, ms until the caller's
# oldest counted send leaves the window} or {2, the same for the account} when a budget is spent.
# Only the newest `cap` times are kept: the cap-th newest inside the window means the budget is
# spent, whatever happened before it.
_BUDGET_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[3])
for i = 1, 2 do
  local oldest = redis.call('LINDEX', KEYS[i], tonumber(ARGV[i]) - 1)
  if oldest and tonumber(oldest) > now - window then
    return {i, tonumber(oldest) + window - now}
  end
end
for i = 1, 2 do
  redis.call('LPUSH', KEYS[i], now)
  redis.call('LTRIM', KEYS[i], 0, tonumber(ARGV[i]) - 1)
  redis.call('PEXPIRE', KEYS[i], window)
end
return {0, now}
"""

# KEYS[1] the caller's send times list, KEYS[2] the account's
# ARGV[1] the time a send was counted at
# Returns 1. Gives back a send that did not happen; any entry with the same time is as good as
# the one counted, since the lists hold only times.
_UNBUDGET_SCRIPT = """
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('LREM', KEYS[2], 1, ARGV[1])
return 1
"""


_OVER_FAILED_VERIFY_BUDGET = 5


@dataclass(frozen=True, kw_only=True)
class Rules:
    """The per-number limits the store enforces."""

    ttl_seconds: int
    max_attempts: int
    resend_cooldown_seconds: int
    max_sends_per_hour: int
    max_failed_verifies_per_hour: int
    caller_sends_per_minute: int
    account_sends_per_minute: int


class Store(Protocol):
    """What the domain needs from storage. Every method is atomic."""

    async def add_code(self, phone: str, digest: str) -> tuple[int, int]:
        """Store a new code's digest if the send limits allow.

        Returns the code's expiry in epoch ms and the ms until the number's next send is allowed.

        Raises LimitExceeded in the cooldown or over the hourly cap, StoreUnavailable on trouble.
        """

    async def count_caller_send(self, caller: str) -> int:
        """Count one send against the caller's and the Interakt account's per-minute budgets.

        Returns a ticket to give it back. Raises LimitExceeded when a budget is spent,
        StoreUnavailable on trouble.
        """

    async def uncount_caller_send(self, caller: str, ticket: int) -> None:
        """Give back a send that did not happen (refused, or not delivered)."""

    async def cancel_code(self, phone: str, digest: str) -> None:
        """Forget a code that was never delivered, and give its send back."""

    async def verify(self, phone: str, digest: str) -> VerifyResult:
        """Count one attempt, compare, and consume the number's codes on a match.

        Raises LimitExceeded while the number is over its hourly budget of wrong codes.
        """

    async def ping(self) -> bool:
        """Whether the store answers now."""

    async def close(self) -> None:
        """Release connections."""


def _codes_key(phone: str) -> str:
    return f"otp:{{{phone}}}:c"


def _sends_key(phone: str) -> str:
    return f"otp:{{{phone}}}:s"


def _failures_key(phone: str) -> str:
    return f"otp:{{{phone}}}:f"


def _budget_keys(caller: str) -> list[str]:
    return [f"otp:{{senders}}:caller:{caller}", "otp:{senders}:interakt"]


# The commands the scripts run inside Redis. INFO commandstats counts them too; the tests and
# the bench leave them out to count round trips.
SCRIPT_COMMANDS = frozenset(
    name.lower()
    for source in (_SEND_SCRIPT, _CANCEL_SCRIPT, _VERIFY_SCRIPT, _BUDGET_SCRIPT, _UNBUDGET_SCRIPT)
    for name in re.findall(r"redis\.call\('(\w+)'", source)
)


class _Script:
    """A Lua script run by its SHA1 (EVALSHA), sent again when Redis answers NOSCRIPT.

    Redis forgets scripts on a restart, a failover or SCRIPT FLUSH; the first call after that
    loads it and runs it again, so the rules keep working. (redis-py's AsyncScript does the same,
    with per-call overhead that was ~5% of VerifyOtp's CPU: bench/README.md.) Every Redis
    failure becomes StoreUnavailable here, the one place the store's commands pass through.
    """

    def __init__(self, client: aioredis.Redis | PipelinedRedis, source: str) -> None:
        self._client = client
        self._source = source
        self._sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, *, keys: Sequence[str], args: Sequence[object]) -> Any:
        """The script's reply; any Redis failure raises StoreUnavailable."""
        command = ("EVALSHA", self._sha, len(keys), *keys, *args)
        try:
            try:
                return await self._client.execute_command(*command)
            except NoScriptError:
                await self._client.execute_command("SCRIPT", "LOAD", self._source)
                return await self._client.execute_command(*command)
        except (RedisError, OSError) as exc:
            metrics.REDIS_ERRORS.inc()
            raise StoreUnavailable("storage is unavailable, try again shortly") from exc


class RedisStore:
    """The Store on Redis (standalone, or Cluster: every script touches one hash slot)."""

    def __init__(self, client: aioredis.Redis | PipelinedRedis, rules: Rules) -> None:
        self._redis = client
        self._rules = rules
        self._send = _Script(client, _SEND_SCRIPT)
        self._cancel = _Script(client, _CANCEL_SCRIPT)
        self._verify = _Script(client, _VERIFY_SCRIPT)
        self._budget = _Script(client, _BUDGET_SCRIPT)
        self._unbudget = _Script(client, _UNBUDGET_SCRIPT)
        self._verify_args = (
            rules.max_attempts,
            rules.max_failed_verifies_per_hour,
            FAILED_VERIFY_WINDOW_MS,
        )
        self._budget_args = (
            rules.caller_sends_per_minute,
            rules.account_sends_per_minute,
            SEND_BUDGET_WINDOW_MS,
        )
        self._send_args = (
            rules.ttl_seconds * 1000,
            rules.resend_cooldown_seconds * 1000,
            rules.max_sends_per_hour,
            SEND_WINDOW_MS,
            rules.max_attempts,
            rules.max_failed_verifies_per_hour,
            FAILED_VERIFY_WINDOW_MS,
        )

    @classmethod
    def from_url(cls, url: str, rules: Rules, *, timeout: float) -> RedisStore:
        """Connect lazily to ``url``; every command fails within about ``timeout`` seconds.

        One pipelined connection instead of redis-py's pool: the pool's per-command overhead
        was a quarter of VerifyOtp's CPU (bench/README.md).
        """
        return cls(PipelinedRedis(url, timeout=timeout), rules)

    async def add_code(self, phone: str, digest: str) -> tuple[int, int]:
        reply = await self._send(
            keys=[_codes_key(phone), _sends_key(phone), _failures_key(phone)],
            args=[digest, *self._send_args],
        )
        status, value = reply[0], reply[1]
        if status == 1:
            raise LimitExceeded(
                "cooldown", "phone_number: a code was sent moments ago", value / 1000
            )
        if status == 2:
            raise LimitExceeded(
                "hourly",
                f"phone_number: at most {self._rules.max_sends_per_hour} codes an hour",
                value / 1000,
            )
        if status == 3:
            raise self._paused(value)
        return int(value), int(reply[2])

    async def count_caller_send(self, caller: str) -> int:
        status, value = await self._budget(keys=_budget_keys(caller), args=self._budget_args)
        if status == 1:
            raise LimitExceeded(
                "caller",
                f"caller: at most {self._rules.caller_sends_per_minute} sends a minute",
                value / 1000,
            )
        if status == 2:
            raise LimitExceeded(
                "account",
                f"the service's WhatsApp budget of {self._rules.account_sends_per_minute} "
                "messages a minute is spent",
                value / 1000,
            )
        return int(value)

    async def uncount_caller_send(self, caller: str, ticket: int) -> None:
        await self._unbudget(keys=_budget_keys(caller), args=[ticket])

    async def cancel_code(self, phone: str, digest: str) -> None:
        await self._cancel(keys=[_codes_key(phone), _sends_key(phone)], args=[digest])

    async def verify(self, phone: str, digest: str) -> VerifyResult:
        outcome, value = await self._verify(
            keys=[_codes_key(phone), _failures_key(phone)], args=[digest, *self._verify_args]
        )
        if outcome == _OVER_FAILED_VERIFY_BUDGET:
            raise self._paused(value)
        return VerifyResult(VerifyOutcome(outcome), value)

    def _paused(self, wait_ms: int) -> LimitExceeded:
        return LimitExceeded(
            "paused",
            f"phone_number: {self._rules.max_failed_verifies_per_hour} wrong codes in the last "
            "hour; verification is paused",
            wait_ms / 1000,
        )

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()
