-- report_delivery.lua: Applies Interakt's delivery report to the number's delivery record.
--
-- KEYS[1] delivery record
-- ARGV[1] Interakt's message id, ARGV[2] the send id the report carries in its callback data
-- ("" when none), ARGV[3] the reported state, ARGV[4] Interakt's failure reason ("" when none),
-- ARGV[5] what the failure means (a DeliveryFailure; 0 unless the state is FAILED), ARGV[6] the
-- code ttl in ms
-- Returns {1, channel (0: not yet known), ms since the code's send (its expiry less the ttl)}
-- when the state moved forward, 0 when the report changes nothing (a redelivery, or older than
-- the state the record has), -1 when the record is not of this message (not ours, an earlier
-- code's, or the code expired).
-- The state only moves forward along QUEUED < SENT < FAILED < DELIVERED < READ, so reports may
-- come in any order and any number of times: the result is the furthest one. A late SENT never
-- takes DELIVERED back, and FAILED after DELIVERED (or READ) is ignored: the message got there.
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
