-- luacheck: read globals send_waits
-- number_state.lua: AdminService's show: a number's codes, attempts, sends, waits and delivery.
--
-- Support actions (otp_service.admin, AdminService). Never a digest out of Redis.
-- KEYS[1] codes hash, KEYS[2] sends zset, KEYS[3] wrong-code times list, KEYS[4] delivery record
-- ARGV[1] cooldown ms, ARGV[2] max sends per window, ARGV[3] window ms, ARGV[4] max wrong codes
-- per failed-verify window, ARGV[5] that window in ms
-- Returns {live codes, newest live code's expiry ms (0: none), attempts used, sends in the
-- window, wrong codes in the failed-verify window, cooldown ms, paused ms, capped ms, delivery
-- state (0: no record), channel, message id, failure reason, the record's expiry ms}. Reads only.
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
