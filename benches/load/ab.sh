#!/usr/bin/env bash
# Side by side cost per proxied request of two or more tollgate builds, under compare.sh's load
# (1000 keys rotated, keep-alive, every request charged and proxied to tollgate-bench-upstream):
# user and kernel instructions (`perf stat` on the gateway) and CPU time (utime + stime from
# /proc), each build run in turn, ROUNDS times. Instruction counts repeat to within a few per
# cent on this shared VM where wall-clock figures drift 2x; run enough rounds for the CPU time.
#
# Usage (from anywhere; needs perf, wrk, python3):  benches/load/ab.sh ROUNDS TOLLGATE...
#   copy each build's target/release/tollgate aside first (the path is reused by every build).
# Knobs (environment): CONNS=64 SECS=4 SUT_CPU=0 GEN_CPU=1
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ROUNDS=$1
shift
CONNS=${CONNS:-64}
SECS=${SECS:-4}
SUT_CPU=${SUT_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

(cd "$ROOT" && cargo build --release --bin tollgate-bench-upstream >&2)
WORK=$(mktemp -d /tmp/tollgate-ab.XXXXXX)
cp "$HERE/tollgate.toml" "$HERE/tollgate-keys.toml" "$WORK/"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

taskset -c "$GEN_CPU" "$TARGET/release/tollgate-bench-upstream" 127.0.0.1:3000 &
PIDS+=($!)
wrk_json() { # seconds
    taskset -c "$GEN_CPU" wrk -t1 -c"$CONNS" -d"$1s" -s "$HERE/keys.lua" \
        http://127.0.0.1:8080/v1/bench | grep '^{'
}
ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
CLK_TCK=$(getconf CLK_TCK)

for round in $(seq "$ROUNDS"); do
    for bin in "$@"; do
        (cd "$WORK" && exec taskset -c "$SUT_CPU" "$bin" --config tollgate.toml --log-level warn) &
        pid=$!
        for _ in $(seq 100); do
            curl -s -o /dev/null http://127.0.0.1:8080/ && break
            sleep 0.1
        done
        wrk_json 1 >/dev/null
        t0=$(ticks "$pid")
        perf stat -x, -e instructions:u,instructions:k -p "$pid" -o "$WORK/perf.txt" -- sleep "$SECS" &
        perf_pid=$!
        json=$(wrk_json "$SECS")
        wait "$perf_pid"
        t1=$(ticks "$pid")
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        python3 - "$bin" "$round" "$json" "$((t1 - t0))" "$CLK_TCK" "$WORK/perf.txt" <<'PY'
import json, sys
bin, rnd, wrk, ticks, tck, perf = sys.argv[1:7]
req = json.loads(wrk)["requests"]
counts = {}
for line in open(perf):
    parts = line.strip().split(",")
    if len(parts) > 2 and parts[0].replace(".", "").isdigit():
        counts[parts[2]] = float(parts[0])
print(f"{bin} round {rnd}: {req} requests, user {counts.get('instructions:u', 0) / req:,.0f} "
      f"and kernel {counts.get('instructions:k', 0) / req:,.0f} instructions per request, "
      f"{int(ticks) / int(tck) * 1e6 / req:.1f} us CPU per request")
PY
    done
done
