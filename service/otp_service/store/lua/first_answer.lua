-- first_answer.lua: What the send holding an idempotency key answered (Store.first_answer).
--
-- KEYS[1] the idempotency key's record
-- Returns {} while nobody holds the key, {0} while its send is running, {1, expiry ms, wait ms,
-- channel, message id} once Interakt accepted it, {2, expiry ms, wait ms left} when it ended in
-- doubt.
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
