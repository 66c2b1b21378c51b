-- luacheck: read globals send_waits
-- status.lua: GetOtpStatus: the latest code's delivery record and when a send is accepted.
--
-- KEYS[1] delivery record, KEYS[2] codes hash, KEYS[3] sends zset, KEYS[4] wrong-code times list
-- ARGV[1] cooldown ms, ARGV[2] max sends per window, ARGV[3] window ms, ARGV[4] max wrong codes
-- per failed-verify window, ARGV[5] that window in ms
-- Returns {} when the number has no live code, else {state, channel (0: not yet known), message
-- id, failure reason, expiry ms, 1 when verified, ms until a send is accepted, failure (0: none),
-- language, the calling service that sent it}.
-- Verified is read from the codes hash: only a verification deletes it while the delivery
-- record lives (the two are written by the same send and expire together), so VerifyOtp does
-- no work for it.
local record = redis.call('HMGET', KEYS[1], 'st', 'ch', 'msg', 'why', 'exp', 'fc', 'ln', 'by')
if not record[1] then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused, cooling, capped = send_waits(now, KEYS[3], KEYS[4], KEYS[1], tonumber(ARGV[1]),
  tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
return {tonumber(record[1]), tonumber(record[2] or '0'), record[3] or '', record[4] or '',
  tonumber(record[5]), 1 - redis.call('EXISTS', KEYS[2]), math.max(paused, cooling, capped),
  tonumber(record[6] or '0'), record[7] or '', record[8] or ''}
