#!/usr/bin/env bash
# Accuracy of limits.backend = "redis" across gateway processes, and its added latency.
# Not part of the test run (it takes ~2 minutes). Usage (as root on Debian):
#   benches/redis_accuracy.sh            knobs: SECS=30 RPM=6000 BURST=1000 CONNS=2 GATEWAYS="1 2 4"
#                                        COSTS="1 3" (route costs measured, one run each)
#
# Accuracy: one redis-server (no persistence), N tollgate processes sharing it, one key, and one
# wrk per gateway (closed loop, CONNS keep-alive connections each) offering far more than the
# limit for SECS seconds, to a route of each cost in COSTS. Admitted (200) requests are compared
# with (burst + rate x time) / cost, time being the longest wrk run. backend_timeout is generous and on_backend_error = "deny", so a
# slow Redis can only lower the count, never inflate it; backend errors are reported. The
# ip_throttle is set out of reach (every request comes from 127.0.0.1).
# Latency: one gateway at a time (local, then redis), limit far above the load, a Python client
# sending LAT_N requests one at a time at LAT_RATE per second on one keep-alive connection.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SECS=${SECS:-30}
RPM=${RPM:-6000}
BURST=${BURST:-1000}
CONNS=${CONNS:-2}
GATEWAYS=${GATEWAYS:-"1 2 4"}
LAT_N=${LAT_N:-3000}
LAT_RATE=${LAT_RATE:-200}

log() { printf '== %s\n' "$*" >&2; }
for tool in wrk:wrk redis-server:redis-server python3:python3 curl:curl; do
    if ! command -v "${tool%%:*}" >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool#*:}"
    fi
done
COSTS=${COSTS:-"1 3"}
(cd "$ROOT" && cargo build --release --bin tollgate --bin tollgate-bench-upstream)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
TOLLGATE=$TARGET/release/tollgate
UPSTREAM=$TARGET/release/tollgate-bench-upstream

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

REDIS_PORT=16379
UP_PORT=13000
redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
PIDS+=($!)
"$UPSTREAM" 127.0.0.1:$UP_PORT &
PIDS+=($!)
until redis-cli -p $REDIS_PORT ping >/dev/null 2>&1; do sleep 0.05; done

# gateway INDEX BACKEND RPM BURST: starts tollgate on 127.0.0.1:18080+INDEX (admin +100).
gateway() {
    local i=$1 backend=$2 rpm=$3 burst=$4
    cat >"$WORK/gw$i.toml" <<TOML
[server]
listen = "127.0.0.1:$((18080 + i))"
[admin]
listen = "127.0.0.1:$((18180 + i))"
[limits]
backend = "$backend"
redis_url = "redis://127.0.0.1:$REDIS_PORT"
backend_timeout = "250ms"
on_backend_error = "deny"
[limits.ip_throttle]             # off, in effect: all the load comes from one client IP
rejections = 4000000000
[plans.bench]
requests_per_minute = $rpm
burst = $burst
[[keys]]
id = "bench"
key = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
plan = "bench"
[[upstreams]]
name = "up"
url = "http://127.0.0.1:$UP_PORT"
[[routes]]
prefix = "/v1/"
upstream = "up"
$(for c in $COSTS; do printf '[[routes]]\nprefix = "/cost%s/"\nupstream = "up"\ncost = %s\n' "$c" "$c"; done)
TOML
    "$TOLLGATE" --config "$WORK/gw$i.toml" >/dev/null 2>&1 &
    PIDS+=($!)
    until curl -sf "http://127.0.0.1:$((18180 + i))/readyz" >/dev/null; do sleep 0.05; done
}

stop_gateways() {
    local keep=(${PIDS[0]} ${PIDS[1]})
    for pid in "${PIDS[@]:2}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    PIDS=("${keep[@]}")
}

backend_errors() {
    curl -s "http://127.0.0.1:$((18180 + $1))/metrics" | awk '/^tollgate_limiter_backend_errors_total/ {print $2}'
}

echo "| cost | gateways | seconds | admitted | expected ((burst + rate x time) / cost) | error | backend errors |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for cost in $COSTS; do
for n in $GATEWAYS; do
    redis-cli -p $REDIS_PORT flushall >/dev/null
    for ((i = 0; i < n; i++)); do gateway "$i" redis "$RPM" "$BURST"; done
    for ((i = 0; i < n; i++)); do
        wrk -t1 -c"$CONNS" -d"${SECS}s" -H 'X-API-Key: test' "http://127.0.0.1:$((18080 + i))/cost$cost/x" >"$WORK/wrk$i.txt" &
    done
    wait $(jobs -p | tail -n "$n")
    python3 - "$WORK" "$n" "$RPM" "$BURST" "$(for ((i = 0; i < n; i++)); do backend_errors "$i"; done | paste -sd+ | bc)" "$cost" <<'PY'
import re, sys
work, n, rpm, burst, errors, cost = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
total = non2xx = 0
secs = 0.0
for i in range(n):
    text = open(f"{work}/wrk{i}.txt").read()
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", text)
    total += int(m.group(1))
    secs = max(secs, float(m.group(2)) / (1000 if m.group(3) == "ms" else 1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    non2xx += int(m.group(1)) if m else 0
admitted = total - non2xx
expected = (burst + rpm / 60 * secs) / cost
print(f"| {cost} | {n} | {secs:.2f} | {admitted} of {total} | {expected:.0f} | {100 * (admitted - expected) / expected:+.2f}% | {errors} |")
PY
    stop_gateways
done
done

echo
echo "| backend | p50 | p99 | max |  ($LAT_N requests at $LAT_RATE/s, one keep-alive connection)"
echo "| --- | --- | --- | --- |"
for backend in local redis; do
    redis-cli -p $REDIS_PORT flushall >/dev/null
    gateway 0 "$backend" 1000000 1000000
    python3 - "$LAT_N" "$LAT_RATE" "$backend" <<'PY'
import http.client, sys, time
n, rate, backend = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
conn = http.client.HTTPConnection("127.0.0.1", 18080)
lat = []
start = time.perf_counter()
for i in range(n + 200):
    due = start + i / rate
    delay = due - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    t = time.perf_counter()
    conn.request("GET", "/v1/x", headers={"X-API-Key": "test"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
    if i >= 200:  # warm-up
        lat.append(time.perf_counter() - t)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
print(f"| {backend} | {q(0.5):.3f} ms | {q(0.99):.3f} ms | {lat[-1] * 1000:.3f} ms |")
PY
    stop_gateways
done
