-- luacheck: read globals send_waits
-- send.lua: SendOtp: stores a new code if the number's limits allow (the cooldown, the
-- hourly cap and the wrong-code pause are decided in lib/send_waits.lua), or answers an
-- idempotency key's repeat.
--
-- KEYS[1] codes hash, KEYS[2] sends zset, KEYS[3] wrong-code times list, KEYS[4] this send's
-- withdrawal tombstone, KEYS[5] delivery record, KEYS[6] the record it replaces, KEYS[7] the
-- idempotency key's record (only for a send with a key)
-- ARGV[1] digest of the new code, ARGV[2] send id, ARGV[3] ttl ms, ARGV[4] cooldown ms,
-- ARGV[5] max sends per window, ARGV[6] window ms, ARGV[7] max attempts,
-- ARGV[8] max wrong codes per failed-verify window, ARGV[9] that window in ms, ARGV[10] how long
-- (ms) a claimed idempotency key waits for its send's answer before another send may take it,
-- ARGV[11] the calling service's name
-- Returns {0, expiry ms, wait ms until the next send, earlier codes found expired unused} when
-- the code is stored, {1, wait ms} in the cooldown, {2, wait ms} over the hourly cap,
-- {3, wait ms} while the number is over its wrong-code budget, {4, 0} when the send was
-- withdrawn before Redis ran this (nothing is stored), {5, expiry ms, wait ms, channel, message
-- id} when the key's first send already answered (that answer again: nothing is stored),
-- {6, 0} while it is still running, {7, expiry ms, wait ms} when it ended in doubt (that answer
-- again: nothing is stored).
local QUEUED = '1' -- constant: DeliveryState.QUEUED

if redis.call('EXISTS', KEYS[4]) == 1 then return {4, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[7]
if key then
  local first = redis.call('HMGET', key, 'done', 'exp', 'wait', 'ch', 'msg', 'at', 'doubt')
  if first[1] then
    return {5, tonumber(first[2]), tonumber(first[3]), tonumber(first[4]), first[5]}
  end
  if first[7] then
    return {7, tonumber(first[2]), math.max(tonumber(first[6]) + tonumber(first[3]) - now, 0)}
  end
  -- A claim older than any send can take is of a send whose process died: this one takes over.
  if first[6] and now < tonumber(first[6]) + tonumber(ARGV[10]) then return {6, 0} end
end
local ttl, cooldown = tonumber(ARGV[3]), tonumber(ARGV[4])
local cap, window = tonumber(ARGV[5]), tonumber(ARGV[6])
local fcap, fwindow = tonumber(ARGV[8]), tonumber(ARGV[9])
local paused, cooling, capped = send_waits(
  now, KEYS[2], KEYS[3], KEYS[5], cooldown, cap, window, fcap, fwindow)
if paused > 0 then return {3, paused} end
if cooling > 0 then return {1, cooling} end
if capped > 0 then return {2, capped} end
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
redis.call('HSET', KEYS[5], 'send', ARGV[2], 'st', QUEUED, 'exp', now + ttl, 'by', ARGV[11])
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
return {0, now + ttl, wait, expired}
