-- count_send.lua: Counts a send against the calling service's and the Interakt account's
-- budgets per minute.
--
-- KEYS[1] the caller's sends zset, KEYS[2] the Interakt account's sends zset, KEYS[3] the
-- send's withdrawal tombstone, KEYS[4] its idempotency key's number (only for a send with a key)
-- ARGV[1] the caller's max sends per window, ARGV[2] the account's, ARGV[3] window ms,
-- ARGV[4] send id, ARGV[5] how many budgets to count it in: 2, or 1 (the caller's only) for a
-- send that does not reach Interakt, ARGV[6] the number, ARGV[7] code ttl ms
-- Returns {0, 0} when the send is counted, {1, ms until the caller's oldest counted send
-- leaves the window} or {2, the same for the account} when a budget is spent, {3, 0} when the
-- send was withdrawn before Redis ran this (nothing is counted), {4, 0} when its idempotency key
-- was used for another number whose code lives (nothing is counted).
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
