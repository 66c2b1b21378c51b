-- cancel_codes.lua: AdminService's cancel: deletes a number's live codes and their delivery record.
--
-- KEYS[1] codes hash, KEYS[2] delivery record, KEYS[3] the record a send in flight replaced
-- Returns the live codes deleted. The delivery record goes too: it would say "verified" of
-- codes that were cancelled (status reads verified from the codes hash being gone).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if fields[i] ~= 'n' and tonumber(fields[i + 1]) > now then live = live + 1 end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return live
