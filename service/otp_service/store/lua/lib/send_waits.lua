-- send_waits.lua: Lua shared by the scripts that need to know when a number may be sent its
-- next code.
-- Returns the waits in ms before it may, each 0 when it does not hold: too many wrong codes in
-- the failed-verify window (no code could verify before then, so sending one would only cost
-- money), the resend cooldown, the cap of sends per window. The cooldown is lifted once
-- Interakt reported that the last send failed, or failed it without taking the message: the
-- user never got that code. Reads only.
-- The loader (store/scripts.py) puts this file in front of each script whose first line is
-- `-- luacheck: read globals send_waits`.
local FAILED = '5' -- constant: DeliveryState.FAILED

-- luacheck: push ignore 211/send_waits (used by the scripts it is prepended to)
local function send_waits(now, sends, failures, record, cooldown, cap, window, fcap, fwindow)
  local paused, cooling, capped = 0, 0, 0
  local failed = redis.call('LINDEX', failures, fcap - 1)
  if failed and tonumber(failed) > now - fwindow then
    paused = tonumber(failed) + fwindow - now
  end
  local last = redis.call('ZRANGE', sends, -1, -1, 'WITHSCORES')
  -- A send Interakt failed without taking the message (":x") holds no cooldown.
  if last[2] and now < tonumber(last[2]) + cooldown and string.sub(last[1], -2) ~= ':x' then
    local delivery = redis.call('HMGET', record, 'send', 'st')
    if delivery[1] ~= last[1] or delivery[2] ~= FAILED then
      cooling = tonumber(last[2]) + cooldown - now
    end
  end
  local from = '(' .. (now - window)
  if redis.call('ZCOUNT', sends, from, '+inf') >= cap then
    local oldest = redis.call('ZRANGEBYSCORE', sends, from, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    capped = tonumber(oldest[2]) + window - now
  end
  return paused, cooling, capped
end
-- luacheck: pop
