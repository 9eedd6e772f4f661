#!/usr/bin/env bash
# Accuracy of limits.backend = "redis" across gateway processes, and its added latency.
# Not part of the test run (it takes ~2 minutes). Usage (as root on Debian):
#   benches/redis_accuracy.sh            knobs: SECS=30 RPM=6000 BURST=1000 CONNS=2 GATEWAYS="1 2 4"
#                                               MODE=single LAT_MODES="local single tls sentinel cluster"
#                                               TOLLGATE=<binary> (default: build the release one)
#                                               COSTS="1 3" (route costs measured, one run each)
#
# MODE is the Redis deployment of the accuracy runs: single (one redis-server), tls (one over
# rediss://, certificates made with openssl), sentinel (a primary, a replica, three
# sentinels) or cluster (three primaries made with redis-cli --cluster create). LAT_MODES are
# the deployments whose latency is compared ("local" is the in-process backend).
#
# Accuracy: the Redis of MODE (no persistence), N tollgate processes sharing it, one key, and one
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
MODE=${MODE:-single}
LAT_MODES=${LAT_MODES:-"local single tls sentinel cluster"}
COSTS=${COSTS:-"1 3"}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "${TOLLGATE:-}" ]; then
    (cd "$ROOT" && cargo build --release --bin tollgate --bin tollgate-bench-upstream)
    TOLLGATE=$TARGET/release/tollgate
fi
UPSTREAM=${UPSTREAM:-$(dirname "$TOLLGATE")/tollgate-bench-upstream}

WORK=$(mktemp -d)
PIDS=()
REDIS_PIDS=()
cleanup() {
    for pid in "${PIDS[@]}" "${REDIS_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

UP_PORT=13000
"$UPSTREAM" 127.0.0.1:$UP_PORT &
PIDS+=($!)
BASE_PIDS=${#PIDS[@]}

REDIS_PORTS=()
REDIS_SECTION=
# redis_start ARGS...: a throwaway redis-server; its pid is kept for redis_stop.
redis_start() {
    redis-server --bind 127.0.0.1 --save '' --appendonly no "$@" >/dev/null &
    REDIS_PIDS+=($!)
}
redis_stop() {
    for pid in "${REDIS_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    REDIS_PIDS=()
    rm -rf "$WORK/redis"
}
wait_ping() { # PORT [redis-cli args]
    local port=$1; shift
    until redis-cli -p "$port" "$@" ping 2>/dev/null | grep -q PONG; do sleep 0.05; done
}
# redis_setup MODE: starts that deployment; sets REDIS_SECTION (the gateways' [redis]) and
# REDIS_PORTS (the primaries, for FLUSHALL).
redis_setup() {
    mkdir -p "$WORK/redis"
    case $1 in
    single)
        redis_start --port 16379 --dir "$WORK/redis"
        wait_ping 16379
        REDIS_PORTS=(16379)
        REDIS_SECTION='url = "redis://127.0.0.1:16379"'
        ;;
    tls)
        local d=$WORK/redis
        openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=bench-ca \
            -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout "$d/srv.key" \
            -out "$d/srv.csr" 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\n' >"$d/ext"
        openssl x509 -req -in "$d/srv.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
            -days 1 -extfile "$d/ext" -out "$d/srv.pem" 2>/dev/null
        redis_start --port 0 --tls-port 16379 --tls-cert-file "$d/srv.pem" --tls-key-file "$d/srv.key" \
            --tls-ca-cert-file "$d/ca.pem" --tls-auth-clients no --dir "$d"
        wait_ping 16379 --tls --cacert "$d/ca.pem"
        REDIS_PORTS=()
        REDIS_SECTION="url = \"rediss://127.0.0.1:16379\"
ca_file = \"$d/ca.pem\""
        ;;
    sentinel)
        local d=$WORK/redis
        redis_start --port 16379 --dir "$d"
        wait_ping 16379
        redis_start --port 16380 --dir "$d" --replicaof 127.0.0.1 16379
        wait_ping 16380
        local list=
        for p in 26379 26380 26381; do
            printf 'port %s\nbind 127.0.0.1\nsentinel monitor bench 127.0.0.1 16379 2\n' "$p" >"$d/s$p.conf"
            redis-server "$d/s$p.conf" --sentinel >/dev/null &
            REDIS_PIDS+=($!)
            wait_ping "$p"
            list="$list\"127.0.0.1:$p\", "
        done
        REDIS_PORTS=(16379)
        REDIS_SECTION="sentinels = [${list%, }]
master_name = \"bench\""
        ;;
    cluster)
        local nodes=
        for p in 16379 16380 16381; do
            mkdir -p "$WORK/redis/$p"
            redis_start --port "$p" --dir "$WORK/redis/$p" --cluster-enabled yes
            wait_ping "$p"
            nodes="$nodes 127.0.0.1:$p"
        done
        # shellcheck disable=SC2086
        redis-cli --cluster create $nodes --cluster-replicas 0 --cluster-yes >/dev/null
        for p in 16379 16380 16381; do
            until redis-cli -p "$p" cluster info | grep -q cluster_state:ok; do sleep 0.05; done
        done
        REDIS_PORTS=(16379 16380 16381)
        REDIS_SECTION='cluster = ["127.0.0.1:16379", "127.0.0.1:16380", "127.0.0.1:16381"]'
        ;;
    *) echo "unknown MODE $1" >&2; exit 2 ;;
    esac
}
redis_flush() {
    for p in "${REDIS_PORTS[@]}"; do redis-cli -p "$p" flushall >/dev/null; done
}

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
[redis]
$REDIS_SECTION
TOML
    "$TOLLGATE" --config "$WORK/gw$i.toml" >/dev/null 2>&1 &
    PIDS+=($!)
    until curl -sf "http://127.0.0.1:$((18180 + i))/readyz" >/dev/null; do sleep 0.05; done
}

stop_gateways() {
    local keep=("${PIDS[@]:0:$BASE_PIDS}")
    for pid in "${PIDS[@]:$BASE_PIDS}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    PIDS=("${keep[@]}")
}

backend_errors() {
    curl -s "http://127.0.0.1:$((18180 + $1))/metrics" | awk '/^tollgate_limiter_backend_errors_total/ {n += $2} END {print n + 0}'
}

redis_setup "$MODE"
echo "Accuracy, Redis deployment: $MODE"
echo "| cost | gateways | seconds | admitted | expected ((burst + rate x time) / cost) | error | backend errors |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for cost in $COSTS; do
for n in $GATEWAYS; do
    redis_flush
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
redis_stop

echo
echo "| backend | p50 | p99 | max |  ($LAT_N requests at $LAT_RATE/s, one keep-alive connection)"
echo "| --- | --- | --- | --- |"
for mode in $LAT_MODES; do
    if [ "$mode" = local ]; then
        REDIS_SECTION=
        gateway 0 local 1000000 1000000
    else
        redis_setup "$mode"
        gateway 0 redis 1000000 1000000
    fi
    python3 - "$LAT_N" "$LAT_RATE" "$mode" <<'PY'
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
    [ "$mode" = local ] || redis_stop
done
