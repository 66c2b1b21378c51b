"""Where codes and counters live: the Store interface and its Redis implementation.

Every rule that concurrent calls could race past is one Lua script, so it holds across any
number of replicas. A number's keys share the hash tag ``{+E164}``, so the scripts also run on
Redis Cluster. Redis keeps only keyed digests of codes, never a code. Time comes from Redis'
own clock (``TIME``), so replicas with skewed clocks still agree on expiry and cooldowns.

Keys for one number:
    otp:{+917003848501}:c   hash   <digest> -> expiry in ms (one field per live code),
                                   "n" -> verification attempts used since the last lockout;
                                   expires with the newest code; expired fields are dropped at
                                   each send.
    otp:{+917003848501}:s   zset   send ids scored by send time in ms: the sends of the last
                                   hour.
    otp:{+917003848501}:f   list   times in ms of the latest wrong codes, newest first, at most
                                   the hourly failed-verify budget of them; expires an hour
                                   after the newest.
    otp:{+917003848501}:withdrawn:<send id>
                            string a failed send with an unanswered command was withdrawn:
                                   that command, should Redis run it late, stores and counts
                                   nothing. Lives one code TTL.
    otp:{+917003848501}:d   hash   the latest send's delivery record: "send" (its send id),
                                   "msg" (Interakt's message id), "ch" (channel), "st" (a
                                   DeliveryState), "why" (Interakt's failure reason), "exp"
                                   (the code's expiry in ms). Expires with the code.
    otp:{+917003848501}:d:prev
                            hash   the record a send in flight replaced: back in place if that
                                   send fails, deleted once Interakt accepted it.
    otp:{+917003848501}:k:<key id>
                            hash   an idempotent send (SendOtpRequest.idempotency_key; the id is
                                   a digest of the caller and the key): "send", "at" (when it
                                   was claimed, ms), then its answer: "exp", "wait", and once
                                   Interakt accepted it "ch", "msg", "done". Expires with the
                                   code.

Send budgets shared by every number (one hash slot of their own, so a second round trip before
a send):
    otp:{senders}:caller-sends:billing  zset  send ids of a calling service scored by send time
                                              in ms: its sends of the last minute.
    otp:{senders}:account-sends         zset  the same for the whole Interakt account, whose
                                              rate limit every replica shares.
    otp:{senders}:withdrawn:<send id>   string  the same as above, for the budgets' count.
    otp:{senders}:k:<key id>            hash    the number ("phone") and send an idempotency key
                                                was used for: a key names one number while its
                                                code lives.

A send that fails is withdrawn (``Store.withdraw``) in the background until Redis has done it,
whatever happened to the commands of the send: answered, timed out (they may still run), or
still on their way on a dropped connection when the withdrawal arrives on a new one. Send ids
make that exact: the withdrawal removes that send's entries, and when a command of the send went
unanswered it leaves a tombstone; the scripts that store and count a send do nothing for a
withdrawn one, so the order in which Redis sees them does not matter.

A send that Interakt accepted is recorded (``Store.record_sent``: its message id, and the answer
an idempotent repeat gets), in the background until Redis has done it (with replica acks,
until the replicas hold it), like a withdrawal.
Interakt's delivery reports then move the record's state forward (``Store.report_delivery``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from redis.exceptions import AuthenticationError, NoScriptError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from otp_service import metrics
from otp_service.errors import (
    ErrorReason,
    InvalidInput,
    LimitExceeded,
    StoreUnavailable,
    StoreUnreachable,
)
from otp_service.results import (
    Channel,
    Delivery,
    DeliveryReport,
    DeliveryState,
    OtpStatus,
    ReportOutcome,
    VerifyOutcome,
    VerifyResult,
)

log = logging.getLogger(__name__)

SEND_WINDOW_MS = 3_600_000
FAILED_VERIFY_WINDOW_MS = 3_600_000
SEND_BUDGET_WINDOW_MS = 60_000

# Delivery states as the records keep them (results.DeliveryState's values).
_QUEUED, _FAILED = 1, 5

# Lua shared by the scripts that need to know when a number may be sent its next code.
# Returns the waits in ms before it may, each 0 when it does not hold: too many wrong codes in
# the failed-verify window (no code could verify before then, so sending one would only cost
# money), the resend cooldown, the cap of sends per window. The cooldown is lifted once
# Interakt reported that the last send failed: the user never got that code. Reads only.
_SEND_WAITS = f"""
local function send_waits(now, sends, failures, record, cooldown, cap, window, fcap, fwindow)
  local paused, cooling, capped = 0, 0, 0
  local failed = redis.call('LINDEX', failures, fcap - 1)
  if failed and tonumber(failed) > now - fwindow then
    paused = tonumber(failed) + fwindow - now
  end
  local last = redis.call('ZRANGE', sends, -1, -1, 'WITHSCORES')
  if last[2] and now < tonumber(last[2]) + cooldown then
    local delivery = redis.call('HMGET', record, 'send', 'st')
    if delivery[1] ~= last[1] or delivery[2] ~= '{_FAILED}' then
      cooling = tonumber(last[2]) + cooldown - now
    end
  end
  local from = '(' .. (now - window)
  if redis.call('ZCOUNT', sends, from, '+inf') >= cap then
    local oldest = redis.call('ZRANGEBYSCORE', sends, from, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    capped = tonumber(oldest[2]) + window - now
  end
  return paused, cooling, capped
end
"""

# KEYS[1] codes hash, KEYS[2] sends zset, KEYS[3] wrong-code times list, KEYS[4] this send's
# withdrawal tombstone, KEYS[5] delivery record, KEYS[6] the record it replaces, KEYS[7] the
# idempotency key's record (only for a send with a key)
# ARGV[1] digest of the new code, ARGV[2] send id, ARGV[3] ttl ms, ARGV[4] cooldown ms,
# ARGV[5] max sends per window, ARGV[6] window ms, ARGV[7] max attempts,
# ARGV[8] max wrong codes per failed-verify window, ARGV[9] that window in ms, ARGV[10] how long
# (ms) a claimed idempotency key waits for its send's answer before another send may take it
# Returns {0, expiry ms, wait ms until the next send} when the code is stored, {1, wait ms} in
# the cooldown, {2, wait ms} over the hourly cap, {3, wait ms} while the number is over its
# wrong-code budget, {4, 0} when the send was withdrawn before Redis ran this (nothing is
# stored), {5, expiry ms, wait ms, channel, message id} when the key's first send already
# answered (that answer again: nothing is stored), {6, 0} while it is still running.
_SEND_SCRIPT = (
    _SEND_WAITS
    + f"""
if redis.call('EXISTS', KEYS[4]) == 1 then return {{4, 0}} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[7]
if key then
  local first = redis.call('HMGET', key, 'done', 'exp', 'wait', 'ch', 'msg', 'at')
  if first[1] then
    return {{5, tonumber(first[2]), tonumber(first[3]), tonumber(first[4]), first[5]}}
  end
  -- A claim older than any send can take is of a send whose process died: this one takes over.
  if first[6] and now < tonumber(first[6]) + tonumber(ARGV[10]) then return {{6, 0}} end
end
local ttl, cooldown = tonumber(ARGV[3]), tonumber(ARGV[4])
local cap, window = tonumber(ARGV[5]), tonumber(ARGV[6])
local fcap, fwindow = tonumber(ARGV[8]), tonumber(ARGV[9])
local paused, cooling, capped = send_waits(
  now, KEYS[2], KEYS[3], KEYS[5], cooldown, cap, window, fcap, fwindow)
if paused > 0 then return {{3, paused}} end
if cooling > 0 then return {{1, cooling}} end
if capped > 0 then return {{2, capped}} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('PEXPIRE', KEYS[2], window)
-- A locked number gets a fresh budget only with a new code; a resend to an unlocked number
-- keeps the attempts already used, so resending cannot extend guessing.
if tonumber(redis.call('HGET', KEYS[1], 'n') or '0') >= tonumber(ARGV[7]) then
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
-- The delivery record is this send's from now on, expiring with its code; the one it replaces
-- is kept aside until Interakt accepts this message, to come back should this send fail.
if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('RENAME', KEYS[5], KEYS[6]) end
redis.call('HSET', KEYS[5], 'send', ARGV[2], 'st', {_QUEUED}, 'exp', now + ttl)
redis.call('PEXPIRE', KEYS[5], ttl)
-- The caller is told when a resend will be accepted: after the cooldown, or after the hour
-- when this send used up the cap.
local _, cooling_after, capped_after = send_waits(
  now, KEYS[2], KEYS[3], KEYS[5], cooldown, cap, window, fcap, fwindow)
local wait = math.max(cooling_after, capped_after)
if key then
  redis.call('DEL', key)
  redis.call('HSET', key, 'send', ARGV[2], 'at', now, 'exp', now + ttl, 'wait', wait)
  redis.call('PEXPIRE', key, ttl)
end
return {{0, now + ttl, wait}}
"""
)

# KEYS[1] codes hash, KEYS[2] sends zset, KEYS[3] the send's withdrawal tombstone, KEYS[4]
# delivery record, KEYS[5] the record the send replaced, KEYS[6] its idempotency key's record
# (only for a send with a key)
# ARGV[1] digest of the send's code, ARGV[2] send id, ARGV[3] tombstone lifetime ms (0: none)
# Returns 1. Removes the code and gives the send back, so a failed send leaves no usable code
# and does not hold the user in the cooldown; the tombstone stops the send script, should it
# run after this, from storing the code again. The delivery record the send replaced comes
# back, and its key may be used again. Running it twice changes nothing.
_CANCEL_SCRIPT = """
if ARGV[3] ~= '0' then redis.call('SET', KEYS[3], 1, 'PX', ARGV[3]) end
redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[4], 'send') == ARGV[2] then
  if redis.call('EXISTS', KEYS[5]) == 1 then
    redis.call('RENAME', KEYS[5], KEYS[4])
  else
    redis.call('DEL', KEYS[4])
  end
end
if KEYS[6] and redis.call('HGET', KEYS[6], 'send') == ARGV[2] then redis.call('DEL', KEYS[6]) end
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

# KEYS[1] the caller's sends zset, KEYS[2] the Interakt account's sends zset, KEYS[3] the
# send's withdrawal tombstone, KEYS[4] its idempotency key's number (only for a send with a key)
# ARGV[1] the caller's max sends per window, ARGV[2] the account's, ARGV[3] window ms,
# ARGV[4] send id, ARGV[5] how many budgets to count it in: 2, or 1 (the caller's only) for a
# send that does not reach Interakt, ARGV[6] the number, ARGV[7] code ttl ms
# Returns {0, 0} when the send is counted, {1, ms until the caller's oldest counted send
# leaves the window} or {2, the same for the account} when a budget is spent, {3, 0} when the
# send was withdrawn before Redis ran this (nothing is counted), {4, 0} when its idempotency key
# was used for another number whose code lives (nothing is counted).
_BUDGET_SCRIPT = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {3, 0} end
-- The send script checked the key in the number's own keys; a key used for another number is
-- only seen here, where every number's keys meet.
if KEYS[4] then
  local number = redis.call('HGET', KEYS[4], 'phone')
  if number and number ~= ARGV[6] then return {4, 0} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[3])
for i = 1, tonumber(ARGV[5]) do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[i]) then
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    return {i, tonumber(oldest[2]) + window - now}
  end
end
for i = 1, tonumber(ARGV[5]) do
  redis.call('ZADD', KEYS[i], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[i], window)
end
if KEYS[4] then
  redis.call('HSET', KEYS[4], 'phone', ARGV[6], 'send', ARGV[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[7])
end
return {0, 0}
"""

# KEYS[1] the caller's sends zset, KEYS[2] the account's, KEYS[3] the send's withdrawal
# tombstone, KEYS[4] its idempotency key's number (only for a send with a key)
# ARGV[1] send id, ARGV[2] tombstone lifetime ms (0: none)
# Returns 1. Gives back a send that did not happen, and its key; the tombstone stops the budget
# script, should it run after this, from counting it again. Running it twice changes nothing.
_UNBUDGET_SCRIPT = """
if ARGV[2] ~= '0' then redis.call('SET', KEYS[3], 1, 'PX', ARGV[2]) end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if KEYS[4] and redis.call('HGET', KEYS[4], 'send') == ARGV[1] then redis.call('DEL', KEYS[4]) end
return 1
"""

# KEYS[1] delivery record, KEYS[2] the record it replaced, KEYS[3] the idempotency key's record
# (only for a send with a key)
# ARGV[1] send id, ARGV[2] channel, ARGV[3] Interakt's message id ("" when none)
# Returns 1 when it recorded the send, 0 when a later send replaced its record and its key
# (nothing to record). Records a send that Interakt accepted: the record it replaced is no
# longer needed, and the key's first answer is complete, for repeats to get. Running it again
# writes the same again (so a replica can be asked to confirm it again) and changes nothing.
_SENT_SCRIPT = """
local recorded = 0
if redis.call('HGET', KEYS[1], 'send') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'ch', ARGV[2])
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'msg', ARGV[3]) end
  redis.call('DEL', KEYS[2])
  recorded = 1
end
if KEYS[3] and redis.call('HGET', KEYS[3], 'send') == ARGV[1] then
  redis.call('HSET', KEYS[3], 'ch', ARGV[2], 'msg', ARGV[3], 'done', 1)
  recorded = 1
end
return recorded
"""

# KEYS[1] the idempotency key's record
# Returns {} while nobody holds the key, {0} while its send is running, {1, expiry ms, wait ms,
# channel, message id} once Interakt accepted it.
_FIRST_ANSWER_SCRIPT = """
local first = redis.call('HMGET', KEYS[1], 'send', 'done', 'exp', 'wait', 'ch', 'msg')
if not first[1] then return {} end
if not first[2] then return {0} end
return {1, tonumber(first[3]), tonumber(first[4]), tonumber(first[5]), first[6]}
"""

# KEYS[1] delivery record
# ARGV[1] Interakt's message id, ARGV[2] the send id the report carries in its callback data
# ("" when none), ARGV[3] the reported state, ARGV[4] Interakt's failure reason ("" when none)
# Returns 1 when the state moved forward, 0 when the report changes nothing (a redelivery, or
# older than the state the record has), -1 when the record is not of this message (not ours,
# an earlier code's, or the code expired).
# The state only moves forward along QUEUED < SENT < FAILED < DELIVERED < READ, so reports may
# come in any order and any number of times: the result is the furthest one. A late SENT never
# takes DELIVERED back, and FAILED after DELIVERED (or READ) is ignored: the message got there.
_REPORT_SCRIPT = """
local record = redis.call('HMGET', KEYS[1], 'send', 'msg', 'st')
if not record[1] then return -1 end
if record[2] then
  if record[2] ~= ARGV[1] then return -1 end
elseif record[1] == ARGV[2] then
  -- Reported before Interakt's answer to the send was recorded: the callback data names it.
  redis.call('HSET', KEYS[1], 'msg', ARGV[1])
else
  return -1
end
-- Ranks by state (QUEUED 1, SENT 2, DELIVERED 3, READ 4, FAILED 5).
local rank = {1, 2, 4, 5, 3}
if rank[tonumber(ARGV[3])] <= rank[tonumber(record[3])] then return 0 end
redis.call('HSET', KEYS[1], 'st', ARGV[3], 'why', ARGV[4])
return 1
"""

# KEYS[1] delivery record, KEYS[2] codes hash, KEYS[3] sends zset, KEYS[4] wrong-code times list
# ARGV[1] cooldown ms, ARGV[2] max sends per window, ARGV[3] window ms, ARGV[4] max wrong codes
# per failed-verify window, ARGV[5] that window in ms
# Returns {} when the number has no live code, else {state, channel (0: not yet known), message
# id, failure reason, expiry ms, 1 when verified, ms until a send is accepted}.
# Verified is read from the codes hash: only a verification deletes it while the delivery
# record lives (the two are written by the same send and expire together), so VerifyOtp does
# no work for it.
_STATUS_SCRIPT = (
    _SEND_WAITS
    + """
local record = redis.call('HMGET', KEYS[1], 'st', 'ch', 'msg', 'why', 'exp')
if not record[1] then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused, cooling, capped = send_waits(now, KEYS[3], KEYS[4], KEYS[1], tonumber(ARGV[1]),
  tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
return {tonumber(record[1]), tonumber(record[2] or '0'), record[3] or '', record[4] or '',
  tonumber(record[5]), 1 - redis.call('EXISTS', KEYS[2]), math.max(paused, cooling, capped)}
"""
)


_OVER_FAILED_VERIFY_BUDGET = 5
_SEND_WITHDRAWN = 4
_FIRST_ANSWERED = 5
_FIRST_RUNNING = 6
_COUNT_WITHDRAWN = 3
_KEY_OF_ANOTHER_NUMBER = 4
# A withdrawal (or a record of a sent message) that Redis did not take is tried again after
# these waits (doubling).
_RETRY_FIRST_SECONDS = 0.1
_RETRY_LAST_SECONDS = 1.0

# What a caller is told when Redis fails it (the domain says the same when Redis is too slow).
STORE_UNAVAILABLE = "storage is unavailable, try again shortly"
# Redis may have run the verification before it failed: fail closed, and say so, so callers
# do not promise users a free retry.
_VERIFY_UNAVAILABLE = (
    f"{STORE_UNAVAILABLE}; the check may still have run, counting this attempt or using up the code"
)
_REPORT_OUTCOMES = {
    1: ReportOutcome.APPLIED,
    0: ReportOutcome.UNCHANGED,
    -1: ReportOutcome.UNKNOWN,
}


@dataclass(frozen=True)
class _Durable:
    """Which replies of a script wrote what a failover must not lose (OTP_REDIS_REPLICA_ACKS
    waits for replicas to hold it), and what a caller is told when they did not confirm it."""

    wrote: Callable[[Any], bool]
    unconfirmed: str


# A stored code: it is delivered only once a failover cannot lose it.
_CODE_STORED = _Durable(
    lambda reply: reply[0] == 0,
    "storage is unavailable: no replica confirmed the new code in time; it was not sent",
)
# A used code or a counted attempt (verified, wrong code, too many attempts): losing either
# would let a code verify twice or give a guesser more tries.
_CODE_USED_OR_COUNTED = _Durable(
    lambda reply: reply[0] in (1, 2, 4),
    "storage is unavailable: no replica confirmed this verification in time; it counted as "
    "an attempt (a right code is used up)",
)
# What a sent message's caller was told (its message id, the answer repeats of its key get):
# losing it would have a repeat wait for an answer that never comes, then be refused or sent
# again. The caller is answered all the same (the message is on its way); the record is made
# again until a replica confirms it, on whichever node is primary by then.
_ANSWER_RECORDED = _Durable(
    lambda reply: reply == 1,
    "storage is unavailable: no replica confirmed the record of a sent message in time",
)


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


class RedisClient(Protocol):
    """What the store needs of a Redis client.

    PipelinedRedis (one Redis, or the primary Sentinel names), redis-py's own clients, and the
    Cluster client of ``redis_backends``: the scripts are the same on each.
    """

    async def execute_command(self, *args: Any) -> Any: ...

    async def ping(self) -> Any: ...

    async def aclose(self) -> None: ...


class ReplicaAcks(Protocol):
    """Runs a command, then ``WAIT replicas timeout`` on the same connection.

    On the same connection because WAIT counts the replicas that hold that connection's writes.
    """

    replicas: int

    async def execute_then_wait(self, *args: Any) -> tuple[Any, int]:
        """The command's reply and how many replicas acknowledged it; raises its error reply."""

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Stored:
    """A new code, stored: its expiry (epoch ms) and the ms until the number's next send."""

    expires_at_ms: int
    resend_after_ms: int


@dataclass(frozen=True, slots=True)
class FirstAnswer:
    """What the first send with an idempotency key answered; its repeats answer the same."""

    expires_at_ms: int
    resend_after_ms: int
    delivery: Delivery


class Pending(enum.Enum):
    """The first send with an idempotency key has not answered yet."""

    RUNNING = "running"


class Store(Protocol):
    """What the domain needs from storage. Every method but ``withdraw`` and ``record_sent`` is
    atomic.

    An idempotency ``key`` is an id for the calling service's key (the domain makes it): the
    store keeps it beside the number's code, for as long as the code lives.
    """

    async def add_code(
        self, phone: str, digest: str, send_id: str, *, key: str | None = None, lease_ms: int = 0
    ) -> Stored | FirstAnswer | Pending:
        """Store a new code's digest for send ``send_id`` if the send limits allow.

        With ``key``: when a send with that key was stored earlier, its answer (FirstAnswer,
        or Pending while it runs) instead, and nothing is stored; a send that claimed the key
        over ``lease_ms`` ago and never answered counts as gone.

        Raises LimitExceeded in the cooldown or over the hourly cap, StoreUnavailable on trouble.
        """

    async def count_caller_send(
        self,
        caller: str,
        send_id: str,
        *,
        account: bool = True,
        phone: str = "",
        key: str | None = None,
    ) -> None:
        """Count send ``send_id`` against the caller's budget and, with ``account``, the
        Interakt account's; with ``key``, claim the key for ``phone``.

        Raises LimitExceeded when a budget is spent, InvalidInput when the key was used for
        another number whose code lives, StoreUnavailable on trouble.
        """

    def withdraw(
        self,
        send_id: str,
        *,
        phone: str,
        digest: str,
        caller: str | None,
        in_doubt: bool,
        key: str | None = None,
    ) -> asyncio.Task[None]:
        """Take back a send that did not happen: its code, its delivery record, its ``key``,
        and with ``caller`` its count.

        Runs in the background until Redis has done it (at most one code TTL). ``in_doubt``: a
        command of the send went unanswered, so Redis may run it after the withdrawal; it will
        then store and count nothing. Returns the task; nobody need wait for it.
        """

    async def record_sent(
        self, send_id: str, *, phone: str, delivery: Delivery, key: str | None = None
    ) -> None:
        """Record that Interakt accepted send ``send_id``: its message id for the delivery
        record, and the answer of its ``key`` for repeats.

        Done once Redis answers (within its timeout; with replica acks, once the replicas hold
        it); if it does not, or the call is cancelled, it goes on in the background until Redis
        has done it (at most one code TTL). Never raises StoreUnavailable: the message went out
        all the same.
        """

    async def first_answer(self, phone: str, key: str) -> FirstAnswer | Pending | None:
        """The answer of the send holding ``key``: Pending while it runs, None when no send
        holds it (it failed, or the code expired)."""

    async def report_delivery(self, report: DeliveryReport) -> ReportOutcome:
        """Apply Interakt's report on a message to the delivery record of its number."""

    async def status(self, phone: str) -> OtpStatus | None:
        """The number's latest code's delivery record; None when it has no live code."""

    async def verify(self, phone: str, digest: str) -> VerifyResult:
        """Count one attempt, compare, and consume the number's codes on a match.

        Raises LimitExceeded while the number is over its hourly budget of wrong codes.
        """

    async def check(self) -> str | None:
        """None when the store answers now; else why not, naming where (never credentials)."""

    async def close(self) -> None:
        """Give withdrawals and records in flight one last try, then release connections."""


def _codes_key(phone: str) -> str:
    return f"otp:{{{phone}}}:c"


def _sends_key(phone: str) -> str:
    return f"otp:{{{phone}}}:s"


def _failures_key(phone: str) -> str:
    return f"otp:{{{phone}}}:f"


def _withdrawn_key(phone: str, send_id: str) -> str:
    return f"otp:{{{phone}}}:withdrawn:{send_id}"


def _delivery_keys(phone: str) -> list[str]:
    """The delivery record and the one a send in flight replaced."""
    return [f"otp:{{{phone}}}:d", f"otp:{{{phone}}}:d:prev"]


def _key_keys(phone: str, key: str | None) -> list[str]:
    """The idempotency key's record beside the number's code (none without a key)."""
    return [] if key is None else [f"otp:{{{phone}}}:k:{key}"]


def _budget_keys(caller: str, send_id: str, key: str | None = None) -> list[str]:
    return [
        f"otp:{{senders}}:caller-sends:{caller}",
        "otp:{senders}:account-sends",
        f"otp:{{senders}}:withdrawn:{send_id}",
        *([] if key is None else [f"otp:{{senders}}:k:{key}"]),
    ]


def _first_answer(expires_at_ms: int, wait_ms: int, channel: int, message_id: bytes) -> FirstAnswer:
    return FirstAnswer(
        int(expires_at_ms), int(wait_ms), Delivery(Channel(channel), message_id.decode())
    )


# The commands the scripts run inside Redis. INFO commandstats counts them too; the tests and
# the bench leave them out to count round trips.
SCRIPT_COMMANDS = frozenset(
    name.lower()
    for source in (
        _SEND_SCRIPT,
        _CANCEL_SCRIPT,
        _VERIFY_SCRIPT,
        _BUDGET_SCRIPT,
        _UNBUDGET_SCRIPT,
        _SENT_SCRIPT,
        _FIRST_ANSWER_SCRIPT,
        _REPORT_SCRIPT,
        _STATUS_SCRIPT,
    )
    for name in re.findall(r"redis\.call\('(\w+)'", source)
)


# What a Redis client raises when Redis fails a command: redis-py's Cluster client raises
# RedisClusterException (not a RedisError) when the nodes are not a Cluster or unreachable.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError)
# A burst of failed commands (an outage) is logged once every this many seconds.
FAILURE_LOG_SECONDS = 10.0


def not_run(error: BaseException) -> bool:
    """Whether a command that failed with ``error`` never reached Redis to run: no connection
    (refused, unknown host), authentication refused, or not the Cluster the URL names."""
    if isinstance(error, AuthenticationError | RedisClusterException):
        return True
    return isinstance(error, RedisConnectionError) and any(
        isinstance(cause, ConnectionRefusedError | socket.gaierror) for cause in _causes(error)
    )


def describe(error: BaseException) -> str:
    """Why Redis failed, for an operator: the kind of trouble first, then redis-py's words
    (which name hosts and ports, never credentials)."""
    causes = _causes(error)
    if any(isinstance(cause, AuthenticationError) for cause in causes):
        kind = "authentication refused (check the user and password in REDIS_URL)"
    elif isinstance(error, RedisClusterException) and "not enabled" in str(error):
        kind = "not a Redis Cluster, though REDIS_URL says redis+cluster://"
    elif any(isinstance(cause, socket.gaierror) for cause in causes):
        kind = "unknown host"
    elif any(isinstance(cause, ConnectionRefusedError) for cause in causes):
        kind = "connection refused"
    elif any(isinstance(cause, TimeoutError) for cause in causes):
        kind = "no answer in time"
    else:
        kind = type(error).__name__
    return f"{kind}: {error}" if str(error) else kind


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and what it was raised from, in turn (redis-py wraps the socket's error)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return chain


class RedisFailures:
    """Logs why Redis fails commands, at most once every FAILURE_LOG_SECONDS (an outage fails
    every call), with how many failed since the last line."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._next = 0.0
        self._unlogged = 0

    def seen(self, error: BaseException) -> None:
        now = time.monotonic()
        if now < self._next:
            self._unlogged += 1
            return
        log.warning(
            "redis at %s failed a command: %s%s",
            self._address,
            describe(error),
            f" ({self._unlogged} more since the last such line)" if self._unlogged else "",
            extra={"event": "redis_command_failed"},
        )
        self._next, self._unlogged = now + FAILURE_LOG_SECONDS, 0


class _Script:
    """A Lua script run by its SHA1 (EVALSHA), sent whole (EVAL) when Redis answers NOSCRIPT.

    Redis forgets scripts on a restart, a failover or SCRIPT FLUSH; EVAL runs the script and
    caches it again on whichever node serves the keys (on a Cluster, the one the keys' slot maps
    to, where SCRIPT LOAD could not be routed), so the rules keep working. (redis-py's
    AsyncScript does the same, with per-call overhead that was ~5% of VerifyOtp's CPU:
    bench/README.md.) Every Redis failure becomes StoreUnavailable here, the one place the
    store's commands pass through, with the script's own ``unavailable`` message.
    """

    def __init__(
        self,
        client: RedisClient,
        source: str,
        unavailable: str = STORE_UNAVAILABLE,
        *,
        failures: RedisFailures,
        acks: ReplicaAcks | None = None,
        durable: _Durable | None = None,
    ) -> None:
        self._failures = failures
        self._source = source
        self._sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        self._unavailable = unavailable
        self._durable = durable
        # With replica acks, a script whose reply may need them runs with WAIT after it.
        self._acks = acks if durable is not None else None
        self._execute: Callable[..., Awaitable[Any]] = client.execute_command
        if self._acks is not None:
            self._execute = self._acks.execute_then_wait

    async def __call__(self, *, keys: Sequence[str], args: Sequence[object]) -> Any:
        """The script's reply; any Redis failure raises StoreUnavailable.

        With replica acks, a reply that wrote what must survive a failover is returned only
        once the replicas hold it; otherwise StoreUnavailable, the write staying on the primary.
        """
        execute = self._execute
        try:
            try:
                reply = await execute("EVALSHA", self._sha, len(keys), *keys, *args)
            except NoScriptError:
                # Not run: NOSCRIPT is answered before anything executes, so sending it again
                # cannot count anything twice.
                reply = await execute("EVAL", self._source, len(keys), *keys, *args)
        except REDIS_FAILURES as exc:
            metrics.REDIS_ERRORS.inc()
            self._failures.seen(exc)
            if not_run(exc):
                # Nothing reached Redis: the caller may be told that nothing happened.
                raise StoreUnreachable(STORE_UNAVAILABLE) from exc
            raise StoreUnavailable(self._unavailable) from exc
        if self._acks is None:
            return reply
        reply, acked = reply
        if acked < self._acks.replicas and self._durable and self._durable.wrote(reply):
            metrics.REDIS_ERRORS.inc()
            raise StoreUnavailable(self._durable.unconfirmed)
        return reply


class RedisStore:
    """The Store on Redis: one node, the primary Sentinel names, or a Cluster (every script
    touches one hash slot).

    With ``acks`` (OTP_REDIS_REPLICA_ACKS), a stored code is sent, and a verify that used a
    code or counted an attempt is answered, only once ``acks.replicas`` replicas hold it, so a
    failover cannot lose a code a user was given, nor bring back a used code or a spent attempt.
    A sent message's record (what repeats of its idempotency key are answered) is made until
    replicas hold it. Delivery reports, the send budgets and which number a key names are not
    waited for: docs/scaling.md says what a failover may lose of them.
    """

    def __init__(
        self,
        client: RedisClient,
        rules: Rules,
        *,
        acks: ReplicaAcks | None = None,
        address: str = "redis",
    ) -> None:
        self._redis = client
        self._rules = rules
        self._acks = acks
        self._address = address
        self._failures = RedisFailures(address)
        script = partial(_Script, client, failures=self._failures)
        self._send = script(_SEND_SCRIPT, acks=acks, durable=_CODE_STORED)
        self._cancel = script(_CANCEL_SCRIPT)
        self._verify = script(
            _VERIFY_SCRIPT, _VERIFY_UNAVAILABLE, acks=acks, durable=_CODE_USED_OR_COUNTED
        )
        self._budget = script(_BUDGET_SCRIPT)
        self._unbudget = script(_UNBUDGET_SCRIPT)
        self._sent = script(_SENT_SCRIPT, acks=acks, durable=_ANSWER_RECORDED)
        self._first = script(_FIRST_ANSWER_SCRIPT)
        self._report = script(_REPORT_SCRIPT)
        self._status = script(_STATUS_SCRIPT)
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
        self._status_args = (
            rules.resend_cooldown_seconds * 1000,
            rules.max_sends_per_hour,
            SEND_WINDOW_MS,
            rules.max_failed_verifies_per_hour,
            FAILED_VERIFY_WINDOW_MS,
        )
        self._ttl_ms = rules.ttl_seconds * 1000
        # A late command of a failed send can only arrive while withdrawals are still tried.
        self._tombstone_ms = self._ttl_ms
        self._background: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()

    async def add_code(
        self, phone: str, digest: str, send_id: str, *, key: str | None = None, lease_ms: int = 0
    ) -> Stored | FirstAnswer | Pending:
        reply = await self._send(
            keys=[
                _codes_key(phone),
                _sends_key(phone),
                _failures_key(phone),
                _withdrawn_key(phone, send_id),
                *_delivery_keys(phone),
                *_key_keys(phone, key),
            ],
            args=[digest, send_id, *self._send_args, lease_ms],
        )
        status, value = reply[0], reply[1]
        if status == 1:
            raise LimitExceeded(
                "cooldown",
                "phone_number: a code was sent moments ago",
                value / 1000,
                {"cooldown_seconds": str(self._rules.resend_cooldown_seconds)},
            )
        if status == 2:
            raise LimitExceeded(
                "hourly",
                f"phone_number: at most {self._rules.max_sends_per_hour} codes an hour",
                value / 1000,
                {"max_sends_per_hour": str(self._rules.max_sends_per_hour)},
            )
        if status == 3:
            raise self._paused(value)
        if status == _SEND_WITHDRAWN:
            raise StoreUnavailable("the send was withdrawn before Redis stored it")
        if status == _FIRST_ANSWERED:
            return _first_answer(*reply[1:])
        if status == _FIRST_RUNNING:
            return Pending.RUNNING
        return Stored(int(value), int(reply[2]))

    async def count_caller_send(
        self,
        caller: str,
        send_id: str,
        *,
        account: bool = True,
        phone: str = "",
        key: str | None = None,
    ) -> None:
        status, value = await self._budget(
            keys=_budget_keys(caller, send_id, key),
            args=[*self._budget_args, send_id, 2 if account else 1, phone, self._ttl_ms],
        )
        if status == 1:
            raise LimitExceeded(
                "caller",
                f"caller: at most {self._rules.caller_sends_per_minute} sends a minute",
                value / 1000,
                {
                    "caller": caller,
                    "max_sends_per_minute": str(self._rules.caller_sends_per_minute),
                },
            )
        if status == 2:
            raise LimitExceeded(
                "account",
                f"the service's WhatsApp budget of {self._rules.account_sends_per_minute} "
                "messages a minute is spent",
                value / 1000,
                {"max_sends_per_minute": str(self._rules.account_sends_per_minute)},
            )
        if status == _COUNT_WITHDRAWN:
            raise StoreUnavailable("the send was withdrawn before Redis counted it")
        if status == _KEY_OF_ANOTHER_NUMBER:
            raise InvalidInput(
                "idempotency_key",
                "was used for another phone number, whose code is still valid; use a new key "
                "for each send",
                ErrorReason.IDEMPOTENCY_KEY_REUSED,
            )

    def withdraw(
        self,
        send_id: str,
        *,
        phone: str,
        digest: str,
        caller: str | None,
        in_doubt: bool,
        key: str | None = None,
    ) -> asyncio.Task[None]:
        # The tombstone that stops the send's late commands; none is needed when all answered.
        ms = self._tombstone_ms if in_doubt else 0
        steps = [
            partial(
                self._cancel,
                keys=[
                    _codes_key(phone),
                    _sends_key(phone),
                    _withdrawn_key(phone, send_id),
                    *_delivery_keys(phone),
                    *_key_keys(phone, key),
                ],
                args=[digest, send_id, ms],
            )
        ]
        if caller is not None:
            steps.append(
                partial(self._unbudget, keys=_budget_keys(caller, send_id, key), args=[send_id, ms])
            )

        def gave_up(error: BaseException) -> None:
            log.error(
                "could not withdraw a failed send: its code stays until it expires and the send "
                "stays counted against the limits (%r)",
                error,
                extra={"event": "send_withdraw_failed"},
            )

        return self._in_background(steps, gave_up)

    async def record_sent(
        self, send_id: str, *, phone: str, delivery: Delivery, key: str | None = None
    ) -> None:
        record = partial(
            self._sent,
            keys=[*_delivery_keys(phone), *_key_keys(phone, key)],
            args=[send_id, delivery.channel.value, delivery.message_id],
        )
        try:
            # Inline first: a task per send to retry what almost always works at once was a
            # measurable part of SendOtp's CPU.
            await record()
        except BaseException as exc:
            # Not taken, or the call was cancelled while Redis ran it (or not): running it
            # again changes nothing if it ran.

            def gave_up(error: BaseException) -> None:
                log.error(
                    "could not record a sent message (or no replica confirmed it): its status "
                    "lacks the message id until Interakt reports on it, and repeats of its "
                    "idempotency key wait for an answer until the key's claim lapses (%r)",
                    error,
                    extra={"event": "send_record_failed"},
                )

            self._in_background([record], gave_up)
            if not isinstance(exc, StoreUnavailable):
                raise

    def _in_background(
        self,
        steps: Sequence[Callable[[], Awaitable[Any]]],
        gave_up: Callable[[BaseException], None],
    ) -> asyncio.Task[None]:
        """A task running each of ``steps`` until Redis has run it once (at most one code TTL),
        calling ``gave_up`` with the last error should it give up. The store's close waits for
        it."""
        task = asyncio.get_running_loop().create_task(self._until_done(steps, gave_up))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _until_done(
        self,
        steps: Sequence[Callable[[], Awaitable[Any]]],
        gave_up: Callable[[BaseException], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        # After one TTL the code has expired by itself; the count of a send outlives it.
        deadline = loop.time() + self._rules.ttl_seconds
        delay = _RETRY_FIRST_SECONDS
        while True:
            results = await asyncio.gather(*(step() for step in steps), return_exceptions=True)
            failed = [
                (step, result)
                for step, result in zip(steps, results, strict=True)
                if isinstance(result, BaseException)
            ]
            if not failed:
                return
            steps = [step for step, _ in failed]
            if self._closing.is_set() or loop.time() + delay >= deadline:
                gave_up(failed[0][1])
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            delay = min(delay * 2, _RETRY_LAST_SECONDS)

    async def first_answer(self, phone: str, key: str) -> FirstAnswer | Pending | None:
        reply = await self._first(keys=_key_keys(phone, key), args=[])
        if not reply:
            return None
        if reply[0] == 0:
            return Pending.RUNNING
        return _first_answer(*reply[1:])

    async def report_delivery(self, report: DeliveryReport) -> ReportOutcome:
        reply = await self._report(
            keys=_delivery_keys(report.phone)[:1],
            args=[report.message_id, report.send_id, report.state.value, report.reason],
        )
        return _REPORT_OUTCOMES[reply]

    async def status(self, phone: str) -> OtpStatus | None:
        reply = await self._status(
            keys=[
                _delivery_keys(phone)[0],
                _codes_key(phone),
                _sends_key(phone),
                _failures_key(phone),
            ],
            args=self._status_args,
        )
        if not reply:
            return None
        state, channel, message_id, reason, expires_at_ms, verified, wait_ms = reply
        return OtpStatus(
            state=DeliveryState(state),
            channel=Channel(channel) if channel else None,
            message_id=message_id.decode(),
            failure_reason=reason.decode() if state == DeliveryState.FAILED.value else "",
            verified=bool(verified),
            expires_at_ms=int(expires_at_ms),
            # Whole seconds, rounded up: a send after this many seconds is not refused.
            resend_after_seconds=-(-wait_ms // 1000),
        )

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
            {"max_failed_verifies_per_hour": str(self._rules.max_failed_verifies_per_hour)},
        )

    async def check(self) -> str | None:
        try:
            if await self._redis.ping():
                return None
            return f"redis at {self._address} did not answer PING"
        except REDIS_FAILURES as exc:
            return f"redis at {self._address}: {describe(exc)}"

    async def close(self) -> None:
        # Work waiting to retry tries once more now; one in flight ends within the timeout.
        self._closing.set()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._redis.aclose()
        if self._acks is not None:
            await self._acks.aclose()
