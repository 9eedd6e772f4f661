#!/usr/bin/env bash
# How often each gateway's sends find its peers asleep: context switches per proxied request of
# the upstream and of the load generator, under compare.sh's one-core load (1000 keys rotated,
# keep-alive, every request charged and proxied; the gateway pinned to SUT_CPU, the upstream
# and wrk on GEN_CPU). On loopback a send runs the receiver's TCP processing and its wake-up on
# the sender's CPU, and waking an idle receiver takes an interrupt to its CPU, charged to the
# sender: the fewer of its sends find a peer asleep, the less kernel time a gateway spends per
# request. Each run also gives the gateway's own user and kernel CPU per request (utime and
# stime). Gateways run one after another, ROUNDS times; medians at the end.
#
# A slower gateway leaves its peers idle more often. To compare at equal throughput,
# NGINX_SLOW=N adds a fourth gateway, nginx-slowed: nginx with N regular expressions that never
# match evaluated on every request (user-space work only; the upstream gets the same request),
# N chosen so that it serves about tollgate's requests per second.
#
# Usage (as root on Debian; needs perf, wrk, nginx, haproxy, python3):
#   benches/load/wakeups.sh [ROUNDS] [TOLLGATE]   default: 3 rounds, the release build
# Knobs (environment): CONNS=64 SECS=5 SUT_CPU=0 GEN_CPU=1 NGINX_SLOW=0
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ROUNDS=${1:-3}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
CONNS=${CONNS:-64}
SECS=${SECS:-5}
SUT_CPU=${SUT_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
NGINX_SLOW=${NGINX_SLOW:-0}
for tool in perf wrk nginx haproxy python3 curl; do
    command -v "$tool" >/dev/null || { echo "wakeups.sh: $tool is missing" >&2; exit 1; }
done
(cd "$ROOT" && cargo build --release --bin tollgate --bin tollgate-bench-upstream >&2)
TOLLGATE=${2:-$TARGET/release/tollgate}

WORK=$(mktemp -d /tmp/tollgate-wakeups.XXXXXX)
mkdir -p "$WORK/tmp" "$WORK/logs"
cp "$HERE"/{tollgate.toml,tollgate-keys.toml,nginx.conf,keys.nginx.map,haproxy.cfg,keys.haproxy.map} "$WORK/"
GATEWAYS=(tollgate nginx haproxy)
if [ "$NGINX_SLOW" -gt 0 ]; then
    GATEWAYS+=(nginx-slowed)
    # A map is evaluated where it is used: each `proxy_set_header` below asks for one, and an
    # empty value sends no field.
    python3 - "$NGINX_SLOW" "$WORK/nginx.conf" "$WORK/nginx-slowed.conf" <<'PY'
import sys
n, src, dst = int(sys.argv[1]), open(sys.argv[2]).read(), sys.argv[3]
maps = "".join(f'    map "$http_x_api_key$request_uri" $slow{i} {{ "~(?:[0-9a-f][0-9a-f])+zq{i}$" x; default ""; }}\n' for i in range(n))
sets = "".join(f"            proxy_set_header X-Slow-{i} $slow{i};\n" for i in range(n))
key_id = "            proxy_set_header X-Key-Id $key_id;\n"
src = src.replace("    upstream bench {", maps + "\n    upstream bench {", 1)
open(dst, "w").write(src.replace(key_id, key_id + sets, 1))
PY
fi
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

taskset -c "$GEN_CPU" "$TARGET/release/tollgate-bench-upstream" 127.0.0.1:3000 &
UPSTREAM=$!
PIDS+=("$UPSTREAM")

declare -A PORT=([tollgate]=8080 [nginx]=8081 [haproxy]=8082 [nginx-slowed]=8081)
start() { # gateway: starts it, its pid in $pid
    case $1 in
        tollgate) (cd "$WORK" && exec taskset -c "$SUT_CPU" "$TOLLGATE" --config tollgate.toml --log-level warn) & ;;
        nginx) (cd "$WORK" && exec taskset -c "$SUT_CPU" nginx -p "$WORK/" -c "$WORK/nginx.conf" -e stderr) & ;;
        nginx-slowed) (cd "$WORK" && exec taskset -c "$SUT_CPU" nginx -p "$WORK/" -c "$WORK/nginx-slowed.conf" -e stderr) & ;;
        haproxy) (cd "$WORK" && exec taskset -c "$SUT_CPU" haproxy -f haproxy.cfg) & ;;
    esac
    pid=$!
    PIDS+=("$pid")
}
WRK=(taskset -c "$GEN_CPU" wrk -t1 -c"$CONNS" -s "$HERE/keys.lua")
switches() { awk -F, '$3 == "context-switches" {print $1}' "$1"; }
# utime and stime of a process, in clock ticks (nginx serves from its worker, a child).
ticks() { awk '{sub(/^.*\) /, ""); print $12, $13}' "/proc/$1/stat"; }

printf 'gateway\tround\trequests\tupstream cs/req\twrk cs/req\tuser us/req\tkernel us/req\n'
RESULTS=$WORK/results.tsv
for round in $(seq "$ROUNDS"); do
    for gateway in "${GATEWAYS[@]}"; do
        start "$gateway"
        for _ in $(seq 100); do
            curl -s -o /dev/null "http://127.0.0.1:${PORT[$gateway]}/" && break
            sleep 0.1
        done
        url="http://127.0.0.1:${PORT[$gateway]}/v1/bench"
        "${WRK[@]}" -d1s "$url" >/dev/null
        serving=$(pgrep -P "$pid" nginx || echo "$pid")
        perf stat -x, -e context-switches -p "$UPSTREAM" -o "$WORK/up.txt" -- sleep "$SECS" &
        perf_pid=$!
        before=$(ticks "$serving")
        json=$(perf stat -x, -e context-switches -o "$WORK/wrk.txt" -- \
            "${WRK[@]}" -d"${SECS}s" "$url" | grep '^{')
        after=$(ticks "$serving")
        wait "$perf_pid"
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        requests=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["requests"])' "$json")
        line=$(python3 -c 'import os, sys; g, r, n, u, w, b, a = sys.argv[1:8]; n = int(n)
tick = 1e6 / os.sysconf("SC_CLK_TCK")
cpu = [(int(y) - int(x)) * tick / n for x, y in zip(b.split(), a.split())]
print(f"{g}\t{r}\t{n}\t{int(u) / n:.3f}\t{int(w) / n:.3f}\t{cpu[0]:.2f}\t{cpu[1]:.2f}")' \
            "$gateway" "$round" "$requests" "$(switches "$WORK/up.txt")" "$(switches "$WORK/wrk.txt")" \
            "$before" "$after")
        echo "$line" | tee -a "$RESULTS"
        sleep 0.5
    done
done
python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    g, _, n, *rest = line.split("\t")
    rows.setdefault(g, []).append((int(n), *map(float, rest)))
print("\nmedians: gateway, requests per run, upstream and wrk context switches per request,"
      " the gateway's user and kernel CPU per request (us)")
for g, runs in rows.items():
    med = [statistics.median(r[i] for r in runs) for i in range(5)]
    print(f"{g}\t{med[0]:.0f}\t{med[1]:.3f}\t{med[2]:.3f}\t{med[3]:.2f}\t{med[4]:.2f}")
PY
