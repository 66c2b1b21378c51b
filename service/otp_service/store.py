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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from otp_service import metrics
from otp_service.errors import LimitExceeded, StoreUnavailable
from otp_service.results import VerifyOutcome, VerifyResult

SEND_WINDOW_MS = 3_600_000

# KEYS[1] codes hash, KEYS[2] sends zset
# ARGV[1] digest of the new code, ARGV[2] ttl ms, ARGV[3] cooldown ms,
# ARGV[4] max sends per window, ARGV[5] window ms, ARGV[6] max attempts
# Returns {0, expiry ms} when the code is stored, {1, wait ms} in the cooldown,
# {2, wait ms} over the hourly cap.
_SEND_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
return {0, now + ttl}
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

# KEYS[1] codes hash
# ARGV[1] digest of the typed code, ARGV[2] max attempts
# Returns {outcome, attempts remaining}: 1 verified, 2 wrong code, 3 no active code,
# 4 too many attempts.
# The attempt is counted before the comparison, so concurrent guesses cannot slip past the
# budget; a match deletes every code of the number, so of concurrent correct calls one wins.
_VERIFY_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {3, 0} end
local max = tonumber(ARGV[2])
local used = redis.call('HINCRBY', KEYS[1], 'n', 1)
if used > max then return {4, 0} end
local expires = redis.call('HGET', KEYS[1], ARGV[1])
if expires then
  local t = redis.call('TIME')
  if tonumber(expires) > tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then
    redis.call('DEL', KEYS[1])
    return {1, 0}
  end
end
return {2, max - used}
"""


@dataclass(frozen=True, kw_only=True)
class Rules:
    """The per-number limits the store enforces."""

    ttl_seconds: int
    max_attempts: int
    resend_cooldown_seconds: int
    max_sends_per_hour: int


class Store(Protocol):
    """What the domain needs from storage. Every method is atomic."""

    async def add_code(self, phone: str, digest: str) -> int:
        """Store a new code's digest if the send limits allow; return its expiry in epoch ms.

        Raises LimitExceeded in the cooldown or over the hourly cap, StoreUnavailable on trouble.
        """

    async def cancel_code(self, phone: str, digest: str) -> None:
        """Forget a code that was never delivered, and give its send back."""

    async def verify(self, phone: str, digest: str) -> VerifyResult:
        """Count one attempt, compare, and consume the number's codes on a match."""

    async def ping(self) -> bool:
        """Whether the store answers now."""

    async def close(self) -> None:
        """Release connections."""


def _codes_key(phone: str) -> str:
    return f"otp:{{{phone}}}:c"


def _sends_key(phone: str) -> str:
    return f"otp:{{{phone}}}:s"


class RedisStore:
    """The Store on Redis (standalone, or Cluster: every script touches one hash slot)."""

    def __init__(self, client: aioredis.Redis, rules: Rules) -> None:
        self._redis = client
        self._rules = rules
        self._send = client.register_script(_SEND_SCRIPT)
        self._cancel = client.register_script(_CANCEL_SCRIPT)
        self._verify = client.register_script(_VERIFY_SCRIPT)
        self._verify_args = (rules.max_attempts,)
        self._send_args = (
            rules.ttl_seconds * 1000,
            rules.resend_cooldown_seconds * 1000,
            rules.max_sends_per_hour,
            SEND_WINDOW_MS,
            rules.max_attempts,
        )

    @classmethod
    def from_url(cls, url: str, rules: Rules, *, timeout: float) -> RedisStore:
        """Connect lazily to ``url``; every command fails within about ``timeout`` seconds."""
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One immediate retry covers a pooled connection that died with a Redis restart;
            # more would only make a caller wait longer for the same UNAVAILABLE.
            retry=Retry(NoBackoff(), 1),
        )
        return cls(client, rules)

    async def add_code(self, phone: str, digest: str) -> int:
        status, value = await self._call(
            self._send(keys=[_codes_key(phone), _sends_key(phone)], args=[digest, *self._send_args])
        )
        if status == 1:
            metrics.count_limit_refusal("cooldown")
            raise LimitExceeded("phone_number: a code was sent moments ago", value / 1000)
        if status == 2:
            metrics.count_limit_refusal("hourly")
            raise LimitExceeded(
                f"phone_number: at most {self._rules.max_sends_per_hour} codes an hour",
                value / 1000,
            )
        return int(value)

    async def cancel_code(self, phone: str, digest: str) -> None:
        await self._call(self._cancel(keys=[_codes_key(phone), _sends_key(phone)], args=[digest]))

    async def verify(self, phone: str, digest: str) -> VerifyResult:
        outcome, remaining = await self._call(
            self._verify(keys=[_codes_key(phone)], args=[digest, *self._verify_args])
        )
        return VerifyResult(VerifyOutcome(outcome), remaining)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()

    @staticmethod
    async def _call(pending: Any) -> Any:
        """Await a Redis call, turning every Redis failure into StoreUnavailable."""
        try:
            return await pending
        except (RedisError, OSError) as exc:
            metrics.REDIS_ERRORS.inc()
            raise StoreUnavailable("storage is unavailable, try again shortly") from exc
