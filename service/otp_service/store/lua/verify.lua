-- verify.lua: VerifyOtp: counts the attempt, compares, consumes.
--
-- KEYS[1] codes hash, KEYS[2] wrong-code times list
-- ARGV[1] digest of the typed code, ARGV[2] max attempts, ARGV[3] max wrong codes per window,
-- ARGV[4] window ms, ARGV[5] its digest under OTP_SECRET_PREVIOUS (only while one is set)
-- Returns {outcome, n}: 1 verified, 2 wrong code (n = attempts remaining), 3 no active code,
-- 4 too many attempts, 5 too many wrong codes in the window (n = ms until the oldest counted one
-- leaves it).
-- The attempt is counted before the comparison, so concurrent guesses cannot slip past the
-- budget; a match deletes every code of the number, so of concurrent correct calls one wins.
-- The hourly budget is checked first: once spent, even the right code is refused, so resending
-- (which refills the per-code budget) cannot buy more guesses.
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
