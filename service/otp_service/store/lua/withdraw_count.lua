-- withdraw_count.lua: Takes back a failed send's count in the send budgets (Store.withdraw).
--
-- KEYS[1] the caller's sends zset, KEYS[2] the account's, KEYS[3] the send's withdrawal
-- tombstone, KEYS[4] its idempotency key's number (only for a send with a key)
-- ARGV[1] send id, ARGV[2] tombstone lifetime ms (0: none), ARGV[3] how many of the send's
-- requests to give back: the most it may have had counted, or 0 when one reached Interakt
-- Returns 1. Gives back a send none of whose requests reached Interakt (each request is counted:
-- the first as the send id, retry n as "<send id>:n"), and frees its key; the tombstone stops
-- the budget script, should it run after this, from counting it again. Running it twice changes
-- nothing.
if ARGV[2] ~= '0' then redis.call('SET', KEYS[3], 1, 'PX', ARGV[2]) end
for i = 1, tonumber(ARGV[3]) do
  local member = ARGV[1]
  if i > 1 then member = member .. ':' .. i end
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
end
if KEYS[4] and redis.call('HGET', KEYS[4], 'send') == ARGV[1] then redis.call('DEL', KEYS[4]) end
return 1
