-- record_sent.lua: Records a send Interakt accepted, or one in doubt (Store.record_sent,
-- Store.record_in_doubt).
--
-- KEYS[1] delivery record, KEYS[2] the record it replaced, KEYS[3] the idempotency key's record
-- (only for a send with a key)
-- ARGV[1] send id, ARGV[2] channel, ARGV[3] Interakt's message id ("" when none), ARGV[4] the
-- template's language ("" when none), ARGV[5] the key's field saying how it ended: "done"
-- (accepted) or "doubt" (in doubt)
-- Returns 1 when it recorded the send, 0 when a later send replaced its record and its key
-- (nothing to record). Records a send that Interakt accepted, or that may have reached it: the
-- record it replaced is no longer needed (Interakt's reports on the message find this one by
-- the send id in their callback data), and the key's first answer is complete, for repeats to
-- get. Running it again writes the same again (so a replica can be asked to confirm it again)
-- and changes nothing.
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
