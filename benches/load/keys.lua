-- wrk script (benches/load/compare.sh): rotates through the API keys in keys.txt, one per
-- request, in the X-API-Key header, to the path of the URL given to wrk; prints a one-line JSON
-- summary at the end. With NO_KEY=1 in the environment the requests carry no key (the load
-- of a public route, benches/load/layers.sh).
local requests = {}
local n = 0
local i = 0

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

-- In init, not at load: wrk sets the Host header (and the path) only then.
function init(_)
    if os.getenv("NO_KEY") == "1" then
        n = 1
        requests[1] = wrk.format("GET", wrk.path)
        return
    end
    for key in io.lines(dir .. "keys.txt") do
        n = n + 1
        -- Pre-formatted requests: the generator spends no time building them under load.
        requests[n] = wrk.format("GET", wrk.path, { ["X-API-Key"] = key })
    end
end

function request()
    i = i % n + 1
    return requests[i]
end

function done(summary, latency, _)
    io.write(string.format(
        '{"requests":%d,"duration_us":%d,"non2xx":%d,"errors":%d,"p50_us":%d,"p99_us":%d}\n',
        summary.requests, summary.duration, summary.errors.status,
        summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
        latency:percentile(50), latency:percentile(99)))
end
