#!/usr/bin/env bash
# How often each gateway's sends find its peers asleep: context switches per proxied request of
# the upstream and of the load generator, under compare.sh's one-core load (1000 keys rotated,
# keep-alive, every request charged and proxied; the gateway pinned to SUT_CPU, the upstream
# and wrk on GEN_CPU). On loopback a send runs the receiver's TCP processing and its wake-up on
# the sender's CPU, and waking an idle receiver takes an interrupt to its CPU, charged to the
# sender: the fewer of its sends find a peer asleep, the less kernel time a gateway spends per
# request. Gateways run one after another, ROUNDS times; medians at the end.
#
# Usage (as root on Debian; needs perf, wrk, nginx, haproxy, python3):
#   benches/load/wakeups.sh [ROUNDS] [TOLLGATE]   default: 3 rounds, the release build
# Knobs (environment): CONNS=64 SECS=5 SUT_CPU=0 GEN_CPU=1
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ROUNDS=${1:-3}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
CONNS=${CONNS:-64}
SECS=${SECS:-5}
SUT_CPU=${SUT_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
for tool in perf wrk nginx haproxy python3 curl; do
    command -v "$tool" >/dev/null || { echo "wakeups.sh: $tool is missing" >&2; exit 1; }
done
(cd "$ROOT" && cargo build --release --bin tollgate --bin tollgate-bench-upstream >&2)
TOLLGATE=${2:-$TARGET/release/tollgate}

WORK=$(mktemp -d /tmp/tollgate-wakeups.XXXXXX)
mkdir -p "$WORK/tmp" "$WORK/logs"
cp "$HERE"/{tollgate.toml,tollgate-keys.toml,nginx.conf,keys.nginx.map,haproxy.cfg,keys.haproxy.map} "$WORK/"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

taskset -c "$GEN_CPU" "$TARGET/release/tollgate-bench-upstream" 127.0.0.1:3000 &
UPSTREAM=$!
PIDS+=("$UPSTREAM")

declare -A PORT=([tollgate]=8080 [nginx]=8081 [haproxy]=8082)
start() { # gateway: starts it, its pid in $pid
    case $1 in
        tollgate) (cd "$WORK" && exec taskset -c "$SUT_CPU" "$TOLLGATE" --config tollgate.toml --log-level warn) & ;;
        nginx) (cd "$WORK" && exec taskset -c "$SUT_CPU" nginx -p "$WORK/" -c "$WORK/nginx.conf" -e stderr) & ;;
        haproxy) (cd "$WORK" && exec taskset -c "$SUT_CPU" haproxy -f haproxy.cfg) & ;;
    esac
    pid=$!
    PIDS+=("$pid")
}
WRK=(taskset -c "$GEN_CPU" wrk -t1 -c"$CONNS" -s "$HERE/keys.lua")
switches() { awk -F, '$3 == "context-switches" {print $1}' "$1"; }

printf 'gateway\tround\trequests\tupstream cs/req\twrk cs/req\n'
RESULTS=$WORK/results.tsv
for round in $(seq "$ROUNDS"); do
    for gateway in tollgate nginx haproxy; do
        start "$gateway"
        for _ in $(seq 100); do
            curl -s -o /dev/null "http://127.0.0.1:${PORT[$gateway]}/" && break
            sleep 0.1
        done
        url="http://127.0.0.1:${PORT[$gateway]}/v1/bench"
        "${WRK[@]}" -d1s "$url" >/dev/null
        perf stat -x, -e context-switches -p "$UPSTREAM" -o "$WORK/up.txt" -- sleep "$SECS" &
        perf_pid=$!
        json=$(perf stat -x, -e context-switches -o "$WORK/wrk.txt" -- \
            "${WRK[@]}" -d"${SECS}s" "$url" | grep '^{')
        wait "$perf_pid"
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        requests=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["requests"])' "$json")
        line=$(python3 -c 'import sys; g, r, n, u, w = sys.argv[1:6]; n = int(n)
print(f"{g}\t{r}\t{n}\t{int(u) / n:.3f}\t{int(w) / n:.3f}")' \
            "$gateway" "$round" "$requests" "$(switches "$WORK/up.txt")" "$(switches "$WORK/wrk.txt")")
        echo "$line" | tee -a "$RESULTS"
        sleep 0.5
    done
done
python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    g, _, n, u, w = line.split("\t")
    rows.setdefault(g, []).append((int(n), float(u), float(w)))
print("\nmedians: gateway, requests per run, upstream and wrk context switches per request")
for g, runs in rows.items():
    print(f"{g}\t{statistics.median(r[0] for r in runs):.0f}\t"
          f"{statistics.median(r[1] for r in runs):.3f}\t{statistics.median(r[2] for r in runs):.3f}")
PY
