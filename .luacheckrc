-- luacheck's settings for the store's Lua scripts (service/otp_service/store/lua/), run by
-- `make lint`. They run inside Redis (Lua 5.1): these are the globals Redis gives a script.
std = "lua51"
read_globals = {
  "redis", "KEYS", "ARGV", "cjson", "cmsgpack", "bit", "struct",
}
max_line_length = 100
