-- GCRA over every bucket of one API key, all-or-nothing: every bucket is checked first, and
-- only if all of them have a token is each one charged. A refusal reports the refusing bucket
-- with the longest wait: told a shorter one, the client would be refused again. Time comes from Redis, so the clocks
-- of the gateway instances do not matter.
--
-- KEYS[i]      tollgate:{<key id>}:<window>:<limit>:<burst>, one per bucket (one hash tag:
--              one cluster slot)
-- ARGV[2i-1]   the bucket's emission interval in microseconds (window / limit)
-- ARGV[2i]     the bucket's capacity (burst)
-- Each key holds the bucket's theoretical arrival time (TAT, Unix microseconds) and expires
-- when the bucket is full again: an absent key is a full bucket.
--
-- Returns {allowed (0|1), reported bucket (0-based), remaining whole tokens,
--          reset_after us (until that bucket is full), retry_after us (0 when allowed)}.
if redis.replicate_commands then
  -- Redis < 5 replicates scripts verbatim unless told to replicate effects; TIME needs effects.
  redis.replicate_commands()
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {}
local refused, wait, refused_reset = -1, 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then
    tat = now
  end
  local allow_at = tat + interval - burst * interval
  if allow_at - now > wait then
    refused, wait, refused_reset = i - 1, allow_at - now, tat - now
  end
  tats[i] = tat + interval
end
if refused >= 0 then
  return {0, refused, 0, refused_reset, wait}
end
local report, least, reset = 0, -1, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local full_in = tats[i] - now
  redis.call('SET', KEYS[i], string.format('%d', tats[i]), 'PX', math.ceil(full_in / 1000))
  local remaining = math.floor((burst * interval - full_in) / interval)
  if least < 0 or remaining < least then
    report, least, reset = i - 1, remaining, full_in
  end
end
return {1, report, least, reset, 0}
