#!/usr/bin/env bash
# Where a proxied request's CPU goes, layer by layer: the gateway's user and kernel CPU per
# request (utime and stime of its process) under compare.sh's one-core load (64 keep-alive
# connections; the gateway pinned to SUT_CPU, wrk and the upstream on GEN_CPU), for
#
#   nginx-return      nginx answering `return 200` itself: nginx's HTTP server alone
#   hyper             tollgate-bench-upstream, hyper's HTTP/1.1 server answering 200 itself:
#                     the server tollgate is built on, alone
#   tollgate-public   tollgate, a public fixed route (`auth = false`, `respond`), no key sent:
#                     its connection layers and the pipeline's own steps
#   tollgate-keyed    tollgate, the same fixed route with keys (compare.sh's 1000 keys):
#                     + the key's authentication, its bucket and the rate-limit headers
#   tollgate-proxied  tollgate as compare.sh runs it: + the upstream side
#   nginx-proxied     nginx as compare.sh runs it (key map, limit_req, keep-alive proxy)
#
# Each in turn, ROUNDS times; medians at the end. wrk's own CPU bounds the fixed answers'
# throughput, so compare their CPU per request, not their requests per second.
#
# Usage (as root on Debian; needs wrk, nginx, python3, curl):
#   benches/load/layers.sh [ROUNDS] [TOLLGATE]   default: 3 rounds, the release build
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
for tool in wrk nginx python3 curl; do
    command -v "$tool" >/dev/null || { echo "layers.sh: $tool is missing" >&2; exit 1; }
done
(cd "$ROOT" && cargo build --release --bin tollgate --bin tollgate-bench-upstream >&2)
TOLLGATE=${2:-$TARGET/release/tollgate}
HYPER=$TARGET/release/tollgate-bench-upstream

WORK=$(mktemp -d /tmp/tollgate-layers.XXXXXX)
mkdir -p "$WORK/tmp" "$WORK/logs"
cp "$HERE"/{tollgate.toml,tollgate-keys.toml,nginx.conf,keys.nginx.map} "$WORK/"
# The fixed routes: compare.sh's config up to its upstreams, then one route answering itself.
fixed_route() { # auth (true|false) -> the config on stdout
    sed '/^\[\[upstreams\]\]/,$d' "$HERE/tollgate.toml"
    printf '[[routes]]\nprefix = "/"\nauth = %s\nrespond = { status = 200, body = "ok" }\n' "$1"
}
fixed_route false >"$WORK/public.toml"
fixed_route true >"$WORK/keyed.toml"
cat >"$WORK/return.conf" <<'EOF'
worker_processes 1;
daemon off;
error_log stderr warn;
pid return.pid;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:8083 reuseport;
        location / {
            return 200 "ok";
        }
    }
}
EOF

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

taskset -c "$GEN_CPU" "$HYPER" 127.0.0.1:3000 &
PIDS+=("$!")

LAYERS=(nginx-return hyper tollgate-public tollgate-keyed tollgate-proxied nginx-proxied)
declare -A PORT=([nginx-return]=8083 [hyper]=8084 [tollgate-public]=8080 [tollgate-keyed]=8080
    [tollgate-proxied]=8080 [nginx-proxied]=8081)
start() { # layer: starts its gateway, the pid in $pid
    case $1 in
        nginx-return) (cd "$WORK" && exec taskset -c "$SUT_CPU" nginx -p "$WORK/" -c "$WORK/return.conf" -e stderr) & ;;
        hyper) taskset -c "$SUT_CPU" "$HYPER" 127.0.0.1:8084 & ;;
        tollgate-public) (cd "$WORK" && exec taskset -c "$SUT_CPU" "$TOLLGATE" --config public.toml --log-level warn) & ;;
        tollgate-keyed) (cd "$WORK" && exec taskset -c "$SUT_CPU" "$TOLLGATE" --config keyed.toml --log-level warn) & ;;
        tollgate-proxied) (cd "$WORK" && exec taskset -c "$SUT_CPU" "$TOLLGATE" --config tollgate.toml --log-level warn) & ;;
        nginx-proxied) (cd "$WORK" && exec taskset -c "$SUT_CPU" nginx -p "$WORK/" -c "$WORK/nginx.conf" -e stderr) & ;;
    esac
    pid=$!
    PIDS+=("$pid")
}
# utime and stime of a process, in clock ticks (nginx serves from its worker, a child).
ticks() { awk '{sub(/^.*\) /, ""); print $12, $13}' "/proc/$1/stat"; }

printf 'layer\tround\trequests\tuser us/req\tkernel us/req\n'
RESULTS=$WORK/results.tsv
for round in $(seq "$ROUNDS"); do
    for layer in "${LAYERS[@]}"; do
        start "$layer"
        for _ in $(seq 100); do
            curl -s -o /dev/null "http://127.0.0.1:${PORT[$layer]}/" && break
            sleep 0.1
        done
        # Keys on every layer but the public route, which checks a key that is sent.
        no_key=$([ "$layer" = tollgate-public ] && echo 1 || echo 0)
        wrk=(env NO_KEY="$no_key" taskset -c "$GEN_CPU" wrk -t1 -c"$CONNS" -s "$HERE/keys.lua")
        url="http://127.0.0.1:${PORT[$layer]}/v1/bench"
        "${wrk[@]}" -d1s "$url" >/dev/null
        serving=$(pgrep -P "$pid" nginx || echo "$pid")
        before=$(ticks "$serving")
        json=$("${wrk[@]}" -d"${SECS}s" "$url" | grep '^{')
        after=$(ticks "$serving")
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        # Every answer is a 200; anything else would measure another path.
        line=$(python3 -c 'import json, os, sys; g, r, js, b, a = sys.argv[1:6]
d = json.loads(js)
n = d["requests"]
if d["non2xx"] or d["errors"]:
    sys.exit("layers.sh: %s: %d answers not 2xx, %d socket errors" % (g, d["non2xx"], d["errors"]))
tick = 1e6 / os.sysconf("SC_CLK_TCK")
cpu = [(int(y) - int(x)) * tick / n for x, y in zip(b.split(), a.split())]
print(f"{g}\t{r}\t{n}\t{cpu[0]:.2f}\t{cpu[1]:.2f}")' "$layer" "$round" "$json" "$before" "$after")
        echo "$line" | tee -a "$RESULTS"
        sleep 0.5
    done
done
python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    g, _, n, u, k = line.split("\t")
    rows.setdefault(g, []).append((int(n), float(u), float(k)))
print("\nmedians: layer, requests per run, user and kernel CPU per request (us)")
for g, runs in rows.items():
    med = [statistics.median(r[i] for r in runs) for i in range(3)]
    print(f"{g}\t{med[0]:.0f}\t{med[1]:.2f}\t{med[2]:.2f}")
PY
