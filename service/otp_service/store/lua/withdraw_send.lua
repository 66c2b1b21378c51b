-- withdraw_send.lua: Takes back a failed send from the number's keys (Store.withdraw).
--
-- KEYS[1] codes hash, KEYS[2] sends zset, KEYS[3] the send's withdrawal tombstone, KEYS[4]
-- delivery record, KEYS[5] the record the send replaced, KEYS[6] its idempotency key's record
-- (only for a send with a key)
-- ARGV[1] digest of the send's code, ARGV[2] send id, ARGV[3] tombstone lifetime ms (0: none),
-- ARGV[4] what stays of the send's count: '0' nothing (it never reached Interakt), '1' all
-- (Interakt refused it: the cooldown holds too), '2' its count against the cap only (Interakt
-- failed it: the user got nothing, so the cooldown is lifted; the member becomes "<id>:x")
-- Returns 1. Removes the code, so a failed send leaves no usable code, and gives back a send
-- that never reached Interakt, so it does not hold the user in the cooldown (one Interakt
-- answered stays counted: a refused number is not retried at full speed); the tombstone stops
-- the send script, should it run after this, from storing the code again. The delivery record
-- the send replaced comes back, and its key may be used again. Running it twice changes nothing.
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
