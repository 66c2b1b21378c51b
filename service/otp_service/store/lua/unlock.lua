-- unlock.lua: AdminService's unlock: clears a number's wrong codes and attempts.
--
-- KEYS[1] codes hash, KEYS[2] wrong-code times list
-- Returns {wrong codes cleared, attempts cleared}. The number is no longer paused for wrong
-- codes, and its live codes have their whole attempt budget again.
local wrong = redis.call('LLEN', KEYS[2])
redis.call('DEL', KEYS[2])
local used = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
redis.call('HDEL', KEYS[1], 'n')
return {wrong, used}
