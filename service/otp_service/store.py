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
                                   hour ("<send id>:x": one Interakt failed without taking
                                   the message, counted against the cap, not the cooldown).
    otp:{+917003848501}:f   list   times in ms of the latest wrong codes, newest first, at most
                                   the hourly failed-verify budget of them; expires an hour
                                   after the newest.
    otp:{+917003848501}:withdrawn:<send id>
                            string a failed send with an unanswered command was withdrawn:
                                   that command, should Redis run it late, stores and counts
                                   nothing. Lives one code TTL.
    otp:{+917003848501}:d   hash   the latest send's delivery record: "send" (its send id),
                                   "by" (the calling service that sent it), "msg" (Interakt's
                                   message id), "ch" (channel), "ln" (a template's language),
                                   "st" (a DeliveryState), "why" (Interakt's failure reason),
                                   "fc" (a DeliveryFailure, 0 unless failed), "exp" (the
                                   code's expiry in ms). Expires with the code.
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
import itertools
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
from otp_service.pipelined_redis import NOT_SENT
from otp_service.results import (
    Channel,
    Delivery,
    DeliveryFailure,
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
# Interakt reported that the last send failed, or failed it without taking the message: the
# user never got that code. Reads only.
_SEND_WAITS = f"""
local function send_waits(now, sends, failures, record, cooldown, cap, window, fcap, fwindow)
  local paused, cooling, capped = 0, 0, 0
  local failed = redis.call('LINDEX', failures, fcap - 1)
  if failed and tonumber(failed) > now - fwindow then
    paused = tonumber(failed) + fwindow - now
  end
  local last = redis.call('ZRANGE', sends, -1, -1, 'WITHSCORES')
  -- A send Interakt failed without taking the message (":x") holds no cooldown.
  if last[2] and now < tonumber(last[2]) + cooldown and string.sub(last[1], -2) ~= ':x' then
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
# (ms) a claimed idempotency key waits for its send's answer before another send may take it,
# ARGV[11] the calling service's name
# Returns {0, expiry ms, wait ms until the next send, earlier codes found expired unused} when
# the code is stored, {1, wait ms} in the cooldown, {2, wait ms} over the hourly cap,
# {3, wait ms} while the number is over its wrong-code budget, {4, 0} when the send was
# withdrawn before Redis ran this (nothing is stored), {5, expiry ms, wait ms, channel, message
# id} when the key's first send already answered (that answer again: nothing is stored),
# {6, 0} while it is still running, {7, expiry ms, wait ms} when it ended in doubt (that answer
# again: nothing is stored).
_SEND_SCRIPT = (
    _SEND_WAITS
    + f"""
if redis.call('EXISTS', KEYS[4]) == 1 then return {{4, 0}} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[7]
if key then
  local first = redis.call('HMGET', key, 'done', 'exp', 'wait', 'ch', 'msg', 'at', 'doubt')
  if first[1] then
    return {{5, tonumber(first[2]), tonumber(first[3]), tonumber(first[4]), first[5]}}
  end
  if first[7] then
    return {{7, tonumber(first[2]), math.max(tonumber(first[6]) + tonumber(first[3]) - now, 0)}}
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
local fields, expired = redis.call('HGETALL', KEYS[1]), 0
for i = 1, #fields, 2 do
  if fields[i] ~= 'n' and tonumber(fields[i + 1]) <= now then
    redis.call('HDEL', KEYS[1], fields[i])
    expired = expired + 1
  end
end
redis.call('HSET', KEYS[1], ARGV[1], now + ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
-- The delivery record is this send's from now on, expiring with its code; the one it replaces
-- is kept aside until Interakt accepts this message, to come back should this send fail.
if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('RENAME', KEYS[5], KEYS[6]) end
redis.call('HSET', KEYS[5], 'send', ARGV[2], 'st', {_QUEUED}, 'exp', now + ttl, 'by', ARGV[11])
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
return {{0, now + ttl, wait, expired}}
"""
)

# KEYS[1] codes hash, KEYS[2] sends zset, KEYS[3] the send's withdrawal tombstone, KEYS[4]
# delivery record, KEYS[5] the record the send replaced, KEYS[6] its idempotency key's record
# (only for a send with a key)
# ARGV[1] digest of the send's code, ARGV[2] send id, ARGV[3] tombstone lifetime ms (0: none),
# ARGV[4] what stays of the send's count: '0' nothing (it never reached Interakt), '1' all
# (Interakt refused it: the cooldown holds too), '2' its count against the cap only (Interakt
# failed it: the user got nothing, so the cooldown is lifted; the member becomes "<id>:x")
# Returns 1. Removes the code, so a failed send leaves no usable code, and gives back a send
# that never reached Interakt, so it does not hold the user in the cooldown (one Interakt
# answered stays counted: a refused number is not retried at full speed); the tombstone stops
# the send script, should it run after this, from storing the code again. The delivery record
# the send replaced comes back, and its key may be used again. Running it twice changes nothing.
_CANCEL_SCRIPT = """
if ARGV[3] ~= '0' then redis.call('SET', KEYS[3], 1, 'PX', ARGV[3]) end
if ARGV[4] ~= '1' then
  local at = redis.call('ZSCORE', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[2])
  if ARGV[4] == '2' and at then redis.call('ZADD', KEYS[2], at, ARGV[2] .. ':x') end
end
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
# ARGV[4] window ms, ARGV[5] its digest under OTP_SECRET_PREVIOUS (only while one is set)
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
if not expires and ARGV[5] then expires = redis.call('HGET', KEYS[1], ARGV[5]) end
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
# ARGV[1] send id, ARGV[2] tombstone lifetime ms (0: none), ARGV[3] how many of the send's
# requests to give back: the most it may have had counted, or 0 when one reached Interakt
# Returns 1. Gives back a send none of whose requests reached Interakt (each request is counted:
# the first as the send id, retry n as "<send id>:n"), and frees its key; the tombstone stops
# the budget script, should it run after this, from counting it again. Running it twice changes
# nothing.
_UNBUDGET_SCRIPT = """
if ARGV[2] ~= '0' then redis.call('SET', KEYS[3], 1, 'PX', ARGV[2]) end
for i = 1, tonumber(ARGV[3]) do
  local member = ARGV[1]
  if i > 1 then member = member .. ':' .. i end
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
end
if KEYS[4] and redis.call('HGET', KEYS[4], 'send') == ARGV[1] then redis.call('DEL', KEYS[4]) end
return 1
"""

# KEYS[1] delivery record, KEYS[2] the record it replaced, KEYS[3] the idempotency key's record
# (only for a send with a key)
# ARGV[1] send id, ARGV[2] channel, ARGV[3] Interakt's message id ("" when none), ARGV[4] the
# template's language ("" when none), ARGV[5] the key's field saying how it ended: "done"
# (accepted) or "doubt" (in doubt)
# Returns 1 when it recorded the send, 0 when a later send replaced its record and its key
# (nothing to record). Records a send that Interakt accepted, or that may have reached it: the
# record it replaced is no longer needed (Interakt's reports on the message find this one by
# the send id in their callback data), and the key's first answer is complete, for repeats to
# get. Running it again writes the same again (so a replica can be asked to confirm it again)
# and changes nothing.
_SENT_SCRIPT = """
local recorded = 0
if redis.call('HGET', KEYS[1], 'send') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'ch', ARGV[2])
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'msg', ARGV[3]) end
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'ln', ARGV[4]) end
  redis.call('DEL', KEYS[2])
  recorded = 1
end
if KEYS[3] and redis.call('HGET', KEYS[3], 'send') == ARGV[1] then
  redis.call('HSET', KEYS[3], 'ch', ARGV[2], 'msg', ARGV[3], ARGV[5], 1)
  recorded = 1
end
return recorded
"""

# KEYS[1] the idempotency key's record
# Returns {} while nobody holds the key, {0} while its send is running, {1, expiry ms, wait ms,
# channel, message id} once Interakt accepted it, {2, expiry ms, wait ms left} when it ended in
# doubt.
_FIRST_ANSWER_SCRIPT = """
local first = redis.call('HMGET', KEYS[1], 'send', 'done', 'exp', 'wait', 'ch', 'msg', 'doubt',
  'at')
if not first[1] then return {} end
if first[7] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return {2, tonumber(first[3]), math.max(tonumber(first[8]) + tonumber(first[4]) - now, 0)}
end
if not first[2] then return {0} end
return {1, tonumber(first[3]), tonumber(first[4]), tonumber(first[5]), first[6]}
"""

# KEYS[1] delivery record
# ARGV[1] Interakt's message id, ARGV[2] the send id the report carries in its callback data
# ("" when none), ARGV[3] the reported state, ARGV[4] Interakt's failure reason ("" when none),
# ARGV[5] what the failure means (a DeliveryFailure; 0 unless the state is FAILED), ARGV[6] the
# code ttl in ms
# Returns {1, channel (0: not yet known), ms since the code's send (its expiry less the ttl)}
# when the state moved forward, 0 when the report changes nothing (a redelivery, or older than
# the state the record has), -1 when the record is not of this message (not ours, an earlier
# code's, or the code expired).
# The state only moves forward along QUEUED < SENT < FAILED < DELIVERED < READ, so reports may
# come in any order and any number of times: the result is the furthest one. A late SENT never
# takes DELIVERED back, and FAILED after DELIVERED (or READ) is ignored: the message got there.
_REPORT_SCRIPT = """
local record = redis.call('HMGET', KEYS[1], 'send', 'msg', 'st', 'ch', 'exp')
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
redis.call('HSET', KEYS[1], 'st', ARGV[3], 'why', ARGV[4], 'fc', ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {1, tonumber(record[4] or '0'), now - (tonumber(record[5]) - tonumber(ARGV[6]))}
"""

# KEYS[1] delivery record, KEYS[2] codes hash, KEYS[3] sends zset, KEYS[4] wrong-code times list
# ARGV[1] cooldown ms, ARGV[2] max sends per window, ARGV[3] window ms, ARGV[4] max wrong codes
# per failed-verify window, ARGV[5] that window in ms
# Returns {} when the number has no live code, else {state, channel (0: not yet known), message
# id, failure reason, expiry ms, 1 when verified, ms until a send is accepted, failure (0: none),
# language, the calling service that sent it}.
# Verified is read from the codes hash: only a verification deletes it while the delivery
# record lives (the two are written by the same send and expire together), so VerifyOtp does
# no work for it.
_STATUS_SCRIPT = (
    _SEND_WAITS
    + """
local record = redis.call('HMGET', KEYS[1], 'st', 'ch', 'msg', 'why', 'exp', 'fc', 'ln', 'by')
if not record[1] then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused, cooling, capped = send_waits(now, KEYS[3], KEYS[4], KEYS[1], tonumber(ARGV[1]),
  tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
return {tonumber(record[1]), tonumber(record[2] or '0'), record[3] or '', record[4] or '',
  tonumber(record[5]), 1 - redis.call('EXISTS', KEYS[2]), math.max(paused, cooling, capped),
  tonumber(record[6] or '0'), record[7] or '', record[8] or ''}
"""
)


# Support actions (otp_service.admin, AdminService). Never a digest out of Redis.
# KEYS[1] codes hash, KEYS[2] sends zset, KEYS[3] wrong-code times list, KEYS[4] delivery record
# ARGV[1] cooldown ms, ARGV[2] max sends per window, ARGV[3] window ms, ARGV[4] max wrong codes
# per failed-verify window, ARGV[5] that window in ms
# Returns {live codes, newest live code's expiry ms (0: none), attempts used, sends in the
# window, wrong codes in the failed-verify window, cooldown ms, paused ms, capped ms, delivery
# state (0: no record), channel, message id, failure reason, the record's expiry ms}. Reads only.
_NUMBER_STATE_SCRIPT = (
    _SEND_WAITS
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, fwindow = tonumber(ARGV[3]), tonumber(ARGV[5])
local live, newest, used = 0, 0, 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local value = tonumber(fields[i + 1])
  if fields[i] == 'n' then
    used = value
  elseif value > now then
    live, newest = live + 1, math.max(newest, value)
  end
end
local wrong = 0
for _, at in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
  if tonumber(at) > now - fwindow then wrong = wrong + 1 end
end
local paused, cooling, capped = send_waits(now, KEYS[2], KEYS[3], KEYS[4], tonumber(ARGV[1]),
  tonumber(ARGV[2]), window, tonumber(ARGV[4]), fwindow)
local record = redis.call('HMGET', KEYS[4], 'st', 'ch', 'msg', 'why', 'exp')
return {live, newest, used, redis.call('ZCOUNT', KEYS[2], '(' .. (now - window), '+inf'), wrong,
  cooling, paused, capped, tonumber(record[1] or '0'), tonumber(record[2] or '0'),
  record[3] or '', record[4] or '', tonumber(record[5] or '0')}
"""
)

# KEYS[1] codes hash, KEYS[2] wrong-code times list
# Returns {wrong codes cleared, attempts cleared}. The number is no longer paused for wrong
# codes, and its live codes have their whole attempt budget again.
_UNLOCK_SCRIPT = """
local wrong = redis.call('LLEN', KEYS[2])
redis.call('DEL', KEYS[2])
local used = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
redis.call('HDEL', KEYS[1], 'n')
return {wrong, used}
"""

# KEYS[1] codes hash, KEYS[2] delivery record, KEYS[3] the record a send in flight replaced
# Returns the live codes deleted. The delivery record goes too: it would say "verified" of
# codes that were cancelled (status reads verified from the codes hash being gone).
_CANCEL_CODES_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if fields[i] ~= 'n' and tonumber(fields[i + 1]) > now then live = live + 1 end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return live
"""

_OVER_FAILED_VERIFY_BUDGET = 5
_SEND_WITHDRAWN = 4
_FIRST_ANSWERED = 5
_FIRST_RUNNING = 6
_FIRST_IN_DOUBT = 7
_COUNT_WITHDRAWN = 3
_KEY_OF_ANOTHER_NUMBER = 4
# A withdrawal (or a record of a sent message) that Redis did not take is tried again after
# these waits (doubling).
_RETRY_FIRST_SECONDS = 0.1
_RETRY_LAST_SECONDS = 1.0
# Failed sends' withdrawals waiting for Redis, at most (see _Withdrawals), and how many numbers'
# are tried at once.
MAX_WAITING_WITHDRAWALS = 1000
_WITHDRAWALS_PER_ROUND = 100

# What a caller is told when Redis fails it (the domain says the same when Redis is too slow).
STORE_UNAVAILABLE = "storage is unavailable, try again shortly"
# Redis may have run the verification before it failed: fail closed, and say so, so callers
# do not promise users a free retry.
_VERIFY_UNAVAILABLE = (
    f"{STORE_UNAVAILABLE}; the check may still have run, counting this attempt or using up the code"
)
_REPORT_OUTCOMES = {
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


@dataclass(eq=False)
class _Withdrawal:
    steps: list[Callable[[], Awaitable[Any]]]
    done: asyncio.Future[None]
    until: float  # the loop's time after which it is given up


class _Withdrawals:
    """The withdrawals of failed sends that Redis has not taken yet, tried by one task.

    A Redis outage must not cost a task, a retry loop and a tombstone per failed send: they wait
    by number (a number's are tried together), at most MAX_WAITING_WITHDRAWALS of them (one
    past that is given up at once); a round tries at most _WITHDRAWALS_PER_ROUND numbers, and
    while Redis keeps failing the rounds are _RETRY_FIRST_SECONDS apart, doubling up to
    _RETRY_LAST_SECONDS. Each is given up after one code TTL (the code has expired by then) or
    at close; giving up is counted (otp_send_withdrawals_given_up_total) and logged.
    """

    def __init__(self, keep_seconds: float, closing: asyncio.Event) -> None:
        self._keep = keep_seconds
        self._closing = closing
        self._waiting: dict[str, list[_Withdrawal]] = {}
        self._count = 0
        self._full = False  # the cap was reached: said once, until there is room again
        self._task: asyncio.Task[None] | None = None

    def add(
        self, phone: str, steps: Sequence[Callable[[], Awaitable[Any]]]
    ) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        withdrawal = _Withdrawal(list(steps), loop.create_future(), loop.time() + self._keep)
        if self._count >= MAX_WAITING_WITHDRAWALS or self._closing.is_set():
            # One line for a run of them: an outage can fail thousands of sends.
            _give_up(withdrawal, "too many withdrawals wait for Redis", quiet=self._full)
            self._full = True
            return withdrawal.done
        self._waiting.setdefault(phone, []).append(withdrawal)
        self._counted(1)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        return withdrawal.done

    async def closed(self) -> None:
        """Wait for the last round (the closing event makes it the last)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay = _RETRY_FIRST_SECONDS
        while self._waiting:
            phones = list(itertools.islice(self._waiting, _WITHDRAWALS_PER_ROUND))
            results = await asyncio.gather(*(self._try(phone) for phone in phones))
            if all(results):
                delay = _RETRY_FIRST_SECONDS
                continue
            if self._closing.is_set():
                for phone in list(self._waiting):
                    for withdrawal in self._waiting.pop(phone):
                        _give_up(withdrawal, "the service stopped before Redis took it")
                self._counted(-self._count)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            delay = min(delay * 2, _RETRY_LAST_SECONDS)

    async def _try(self, phone: str) -> bool:
        """Try the number's withdrawals once; whether Redis took them all."""
        withdrawals = self._waiting.pop(phone)
        now = asyncio.get_running_loop().time()
        results = await asyncio.gather(
            *(step() for w in withdrawals for step in w.steps), return_exceptions=True
        )
        left: list[_Withdrawal] = []
        answers = iter(results)
        for withdrawal in withdrawals:
            failed = [
                (step, answer)
                for step, answer in zip(withdrawal.steps, answers, strict=False)
                if isinstance(answer, BaseException)
            ]
            if not failed:
                withdrawal.done.set_result(None)
            elif now >= withdrawal.until:
                _give_up(withdrawal, repr(failed[0][1]))
            else:
                withdrawal.steps = [step for step, _ in failed]
                left.append(withdrawal)
        self._counted(len(left) - len(withdrawals))
        if left:
            # At the back of the line: the other numbers get their turn first.
            self._waiting.setdefault(phone, []).extend(left)
        return not left

    def _counted(self, change: int) -> None:
        self._count += change
        self._full = self._full and self._count >= MAX_WAITING_WITHDRAWALS
        metrics.WITHDRAWALS_WAITING.inc(change)


def _give_up(withdrawal: _Withdrawal, why: str, *, quiet: bool = False) -> None:
    metrics.WITHDRAWALS_GIVEN_UP.inc()
    if not quiet:
        log.error(
            "could not withdraw a failed send: its code stays until it expires and the send "
            "stays counted against the limits (%s; otp_send_withdrawals_given_up_total counts "
            "every one)",
            why,
            extra={"event": "send_withdraw_failed"},
        )
    withdrawal.done.set_result(None)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class NumberState:
    """What a support desk may see of a number (AdminService): counts and waits, never a code."""

    live_codes: int
    codes_expire_at_ms: int  # 0 without a live code
    attempts_used: int
    sends_in_window: int
    wrong_codes_in_window: int
    cooldown_ms: int
    paused_ms: int
    capped_ms: int
    latest: OtpStatus | None  # its latest delivery record; ``verified`` is left False


@dataclass(frozen=True, slots=True)
class InDoubt:
    """The first send with an idempotency key ended in doubt (its message may have arrived):
    its code's expiry (epoch ms) and the ms until the number's next send."""

    expires_at_ms: int
    resend_after_ms: int


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
        self,
        phone: str,
        digest: str,
        send_id: str,
        *,
        key: str | None = None,
        lease_ms: int = 0,
        caller: str = "",
    ) -> Stored | FirstAnswer | InDoubt | Pending:
        """Store a new code's digest for send ``send_id`` of ``caller`` if the send limits allow.

        With ``key``: when a send with that key was stored earlier, its answer (FirstAnswer,
        InDoubt, or Pending while it runs) instead, and nothing is stored; a send that claimed
        the key over ``lease_ms`` ago and never answered counts as gone.

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
        request: int = 1,
    ) -> None:
        """Count request ``request`` of send ``send_id`` (1, or a retry: 2, 3...; each request
        made to Interakt counts) against the caller's budget and, with ``account``, the
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
        reached: bool = False,
        refused: bool = False,
        requests: int = 1,
        key: str | None = None,
    ) -> asyncio.Future[None]:
        """Take back a send whose message did not go out: its code, its delivery record, its
        ``key``; and unless it ``reached`` Interakt (which answered without taking it), its
        count against the number's cooldown and cap, and with ``caller`` its ``requests``
        counted in the send budgets. One that reached it holds the number's cooldown only if
        Interakt ``refused`` it (a lasting refusal; a 5xx or a 429 lifts it).

        Done in the background until Redis has done it (at most one code TTL; a bounded number
        wait, see _Withdrawals). ``in_doubt``: a command of the send went unanswered, so Redis
        may run it after the withdrawal; it will then store and count nothing. Returns a future
        done when it is over; nobody need wait for it.
        """

    def record_in_doubt(
        self, send_id: str, *, phone: str, channel: Channel, key: str | None = None
    ) -> asyncio.Task[None]:
        """Record that send ``send_id`` may have reached Interakt without its answer: its
        ``key``'s repeats answer that (in doubt) and send nothing; its code and counts stay.

        Done in the background until Redis has done it (at most one code TTL). Returns the
        task; nobody need wait for it.
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

    async def first_answer(self, phone: str, key: str) -> FirstAnswer | InDoubt | Pending | None:
        """The answer of the send holding ``key``: Pending while it runs, InDoubt when it ended
        in doubt, None when no send holds it (it failed, or the code expired)."""

    async def report_delivery(self, report: DeliveryReport) -> ReportOutcome:
        """Apply Interakt's report on a message to the delivery record of its number."""

    async def status(self, phone: str) -> tuple[OtpStatus, str] | None:
        """The number's latest code's delivery record and the calling service that sent it;
        None when it has no live code."""

    async def verify(self, phone: str, digest: str, previous: str | None = None) -> VerifyResult:
        """Count one attempt, compare (with ``previous``, the typed code's digest under the
        previous secret, too), and consume the number's codes on a match.

        Raises LimitExceeded while the number is over its hourly budget of wrong codes.
        """

    async def check(self) -> str | None:
        """None when the store answers now; else why not, naming where (never credentials)."""

    async def close(self) -> None:
        """Give withdrawals and records in flight one last try, then release connections."""

    async def number_state(self, phone: str) -> NumberState:
        """The number's codes, attempts, sends, waits and latest delivery (AdminService)."""

    async def unlock(self, phone: str) -> tuple[int, int]:
        """Clear the number's wrong codes and its codes' attempts: how many of each."""

    async def cancel_codes(self, phone: str) -> int:
        """Delete the number's live codes and their delivery record: how many codes."""


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
        _NUMBER_STATE_SCRIPT,
        _UNLOCK_SCRIPT,
        _CANCEL_CODES_SCRIPT,
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
    if NOT_SENT in getattr(error, "__notes__", ()):  # PipelinedRedis could open no connection
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
        self._number_state = script(_NUMBER_STATE_SCRIPT)
        self._unlock = script(_UNLOCK_SCRIPT)
        self._cancel_codes = script(_CANCEL_CODES_SCRIPT)
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
        self._withdrawals = _Withdrawals(rules.ttl_seconds, self._closing)

    async def add_code(
        self,
        phone: str,
        digest: str,
        send_id: str,
        *,
        key: str | None = None,
        lease_ms: int = 0,
        caller: str = "",
    ) -> Stored | FirstAnswer | InDoubt | Pending:
        reply = await self._send(
            keys=[
                _codes_key(phone),
                _sends_key(phone),
                _failures_key(phone),
                _withdrawn_key(phone, send_id),
                *_delivery_keys(phone),
                *_key_keys(phone, key),
            ],
            args=[digest, send_id, *self._send_args, lease_ms, caller],
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
        if status == _FIRST_IN_DOUBT:
            return InDoubt(int(value), int(reply[2]))
        if reply[3]:
            metrics.CODES_EXPIRED.inc(reply[3])
        return Stored(int(value), int(reply[2]))

    async def count_caller_send(
        self,
        caller: str,
        send_id: str,
        *,
        account: bool = True,
        phone: str = "",
        key: str | None = None,
        request: int = 1,
    ) -> None:
        # Retry n of a send is a request of its own, counted under a member of its own.
        member = send_id if request == 1 else f"{send_id}:{request}"
        status, value = await self._budget(
            keys=_budget_keys(caller, send_id, key),
            args=[*self._budget_args, member, 2 if account else 1, phone, self._ttl_ms],
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
        reached: bool = False,
        refused: bool = False,
        requests: int = 1,
        key: str | None = None,
    ) -> asyncio.Future[None]:
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
                args=[digest, send_id, ms, (2 - refused) if reached else 0],
            )
        ]
        if caller is not None and not (reached and key is None and not in_doubt):
            # A send that reached Interakt keeps its requests counted: only its key is freed.
            steps.append(
                partial(
                    self._unbudget,
                    keys=_budget_keys(caller, send_id, key),
                    args=[send_id, ms, 0 if reached else requests],
                )
            )
        return self._withdrawals.add(phone, steps)

    def record_in_doubt(
        self, send_id: str, *, phone: str, channel: Channel, key: str | None = None
    ) -> asyncio.Task[None]:
        record = partial(
            self._sent,
            keys=[*_delivery_keys(phone), *_key_keys(phone, key)],
            args=[send_id, channel.value, "", "", "doubt"],
        )

        def gave_up(error: BaseException) -> None:
            log.error(
                "could not record a send in doubt: repeats of its idempotency key wait for an "
                "answer until the key's claim lapses (%r)",
                error,
                extra={"event": "send_record_failed"},
            )

        return self._in_background([record], gave_up)

    async def record_sent(
        self, send_id: str, *, phone: str, delivery: Delivery, key: str | None = None
    ) -> None:
        record = partial(
            self._sent,
            keys=[*_delivery_keys(phone), *_key_keys(phone, key)],
            args=[send_id, delivery.channel.value, delivery.message_id, delivery.language, "done"],
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

    async def first_answer(self, phone: str, key: str) -> FirstAnswer | InDoubt | Pending | None:
        reply = await self._first(keys=_key_keys(phone, key), args=[])
        if not reply:
            return None
        if reply[0] == 0:
            return Pending.RUNNING
        if reply[0] == 2:
            return InDoubt(int(reply[1]), int(reply[2]))
        return _first_answer(*reply[1:])

    async def report_delivery(self, report: DeliveryReport) -> ReportOutcome:
        reply = await self._report(
            keys=_delivery_keys(report.phone)[:1],
            args=[
                report.message_id,
                report.send_id,
                report.state.value,
                report.reason,
                report.failure.value if report.failure else 0,
                self._ttl_ms,
            ],
        )
        if isinstance(reply, list):
            channel, since_send_ms = reply[1:]
            metrics.count_delivery(
                report.state.name.lower(),
                Channel(channel).name.lower() if channel else "unknown",
                since_send_ms / 1000,
            )
            return ReportOutcome.APPLIED
        return _REPORT_OUTCOMES[reply]

    async def status(self, phone: str) -> tuple[OtpStatus, str] | None:
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
        (state, channel, message_id, reason, expires_at_ms, verified, wait_ms) = reply[:7]
        failure, language, sent_by = reply[7:]
        failed = state == DeliveryState.FAILED.value
        status = OtpStatus(
            state=DeliveryState(state),
            channel=Channel(channel) if channel else None,
            message_id=message_id.decode(),
            failure_reason=reason.decode() if failed else "",
            verified=bool(verified),
            expires_at_ms=int(expires_at_ms),
            # Whole seconds, rounded up: a send after this many seconds is not refused.
            resend_after_seconds=-(-wait_ms // 1000),
            # A failure reported before failures were typed has none: UNKNOWN.
            failure=DeliveryFailure(failure or DeliveryFailure.UNKNOWN.value) if failed else None,
            language=language.decode(),
        )
        return status, sent_by.decode()

    async def verify(self, phone: str, digest: str, previous: str | None = None) -> VerifyResult:
        args = [digest, *self._verify_args]
        if previous is not None:
            args.append(previous)
        outcome, value = await self._verify(
            keys=[_codes_key(phone), _failures_key(phone)], args=args
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

    async def number_state(self, phone: str) -> NumberState:
        reply = await self._number_state(
            keys=[
                _codes_key(phone),
                _sends_key(phone),
                _failures_key(phone),
                _delivery_keys(phone)[0],
            ],
            args=self._status_args,
        )
        live, newest, used, sends, wrong, cooldown, paused, capped = (int(v) for v in reply[:8])
        state, channel, message_id, reason, expires_at_ms = reply[8:]
        latest = None
        if state:
            latest = OtpStatus(
                state=DeliveryState(state),
                channel=Channel(channel) if channel else None,
                message_id=message_id.decode(),
                failure_reason=reason.decode() if state == DeliveryState.FAILED.value else "",
                verified=False,
                expires_at_ms=int(expires_at_ms),
                resend_after_seconds=-(-max(cooldown, paused, capped) // 1000),
            )
        return NumberState(
            live_codes=live,
            codes_expire_at_ms=newest,
            attempts_used=min(used, self._rules.max_attempts),
            sends_in_window=sends,
            wrong_codes_in_window=wrong,
            cooldown_ms=cooldown,
            paused_ms=paused,
            capped_ms=capped,
            latest=latest,
        )

    async def unlock(self, phone: str) -> tuple[int, int]:
        wrong, used = await self._unlock(keys=[_codes_key(phone), _failures_key(phone)], args=[])
        return int(wrong), min(int(used), self._rules.max_attempts)

    async def cancel_codes(self, phone: str) -> int:
        return int(
            await self._cancel_codes(keys=[_codes_key(phone), *_delivery_keys(phone)], args=[])
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
        await self._withdrawals.closed()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._redis.aclose()
        if self._acks is not None:
            await self._acks.aclose()
