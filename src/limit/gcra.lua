-- One charge decision for one API key, all-or-nothing: GCRA over every bucket the request is
-- charged to (the plan's, then the route's), each taking `cost` tokens, and the monthly
-- quota counter. Everything is checked first, and only if every bucket has `cost` tokens and
-- the quota has `cost` left is anything charged. A refusal reports the refusing bucket with
-- the longest wait: told a shorter one, the client would be refused again. Time comes from
-- Redis, so the clocks of the gateway instances do not matter (except for which month's
-- quota key they name).
--
-- KEYS[i], i <= n    tollgate:{<key id>}:<window>:<limit>:<burst> (plan buckets) and
--                    tollgate:{<key id>}:route:<prefix>:<window>:<limit>:<burst> (route
--                    buckets); one hash tag, one cluster slot
-- KEYS[n+1]          with a quota: tollgate:{<key id>}:month:<YYYY-MM>, the count
-- ARGV[1]            cost: tokens per bucket, requests counted against the quota (0: look only)
-- ARGV[2]            n, the number of buckets
-- ARGV[3]            the quota (0: none)
-- ARGV[4]            Unix seconds when the quota key expires (a day after the month ends)
-- ARGV[3+2i]         bucket i's emission interval in microseconds (window / limit)
-- ARGV[4+2i]         bucket i's capacity (burst)
-- Each bucket key holds the bucket's theoretical arrival time (TAT, Unix microseconds) and
-- expires when the bucket is full again: an absent key is a full bucket.
--
-- Returns {allowed (0|1), reported bucket (0-based; n = the quota refused),
--          remaining whole tokens, reset_after us (until that bucket is full),
--          retry_after us (0 when allowed), quota count after this request (or before a
--          refusal)}.
if redis.replicate_commands then
  -- Redis < 5 replicates scripts verbatim unless told to replicate effects; TIME needs effects.
  redis.replicate_commands()
end
local cost = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local quota = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {}
local refused, wait, refused_reset = -1, 0, 0
for i = 1, n do
  local interval = tonumber(ARGV[3 + 2 * i])
  local burst = tonumber(ARGV[4 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then
    tat = now
  end
  local allow_at = tat + cost * interval - burst * interval
  if cost > burst then
    -- More than the bucket holds: refused however long the client waits.
    allow_at = now + burst * interval
  end
  if allow_at - now > wait then
    refused, wait, refused_reset = i - 1, allow_at - now, tat - now
  end
  tats[i] = tat + cost * interval
end
if refused >= 0 then
  return {0, refused, 0, refused_reset, wait, 0}
end
local used = 0
if quota > 0 then
  used = tonumber(redis.call('GET', KEYS[n + 1])) or 0
  if used + cost > quota then
    return {0, n, 0, 0, 0, used}
  end
end
local report, least, reset = 0, -1, 0
for i = 1, n do
  local interval = tonumber(ARGV[3 + 2 * i])
  local burst = tonumber(ARGV[4 + 2 * i])
  local full_in = tats[i] - now
  if cost > 0 then
    redis.call('SET', KEYS[i], string.format('%d', tats[i]), 'PX', math.ceil(full_in / 1000))
  end
  local remaining = math.floor((burst * interval - full_in) / interval)
  if least < 0 or remaining < least then
    report, least, reset = i - 1, remaining, full_in
  end
end
if quota > 0 and cost > 0 then
  used = redis.call('INCRBY', KEYS[n + 1], cost)
  redis.call('EXPIREAT', KEYS[n + 1], ARGV[4])
end
return {1, report, least, reset, 0, used}
