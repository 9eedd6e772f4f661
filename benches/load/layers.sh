#!/usr/bin/env bash
# Where a request's CPU goes: each gateway's user and kernel CPU per request (utime and stime
# of its process) under compare.sh's one-core load (64 keep-alive connections, the 1000 keys
# rotated; the gateway pinned to SUT_CPU, wrk and the upstream on GEN_CPU), layer by layer:
#
#   nginx-return      nginx answering `return 200` itself: nginx's HTTP server alone
#   hyper             tollgate-bench-upstream, hyper's HTTP/1.1 server answering 200 itself:
#                     the server tollgate is built on, alone
#   tollgate-public   tollgate, a public fixed route (`auth = false`, `respond`), no key sent:
#                     its connection layers and the pipeline's own steps
#   tollgate-keyed    tollgate, the same fixed route with keys: + the key's authentication, its
#                     bucket and the rate-limit headers
#   tollgate-proxied  tollgate as compare.sh runs it: + the upstream side
#   nginx-proxied     nginx as compare.sh runs it (key map, limit_req, keep-alive proxy)
#   haproxy-proxied   HAProxy as compare.sh runs it
#   nginx-slowed      nginx-proxied with NGINX_SLOW regular expressions that never match
#                     evaluated on every request (user-space work only; the upstream gets the
#                     same request): NGINX_SLOW chosen so that it serves about tollgate's
#                     requests per second, to compare the two at equal throughput
#
# With SWITCHES=1 each run also counts how often the gateway's sends find its peers asleep:
# the context switches of the upstream and of wrk per request (`perf stat`). On loopback a
# send runs the receiver's TCP processing and its wake-up on the sender's CPU, and waking an
# idle receiver takes an interrupt to its CPU, charged to the sender; a slower gateway leaves
# its peers idle more often.
#
# Layers run one after another, ROUNDS times; medians at the end. wrk's own CPU bounds the
# fixed answers' throughput, so compare their CPU per request, not their requests per second.
#
# Usage (as root on Debian; needs wrk, nginx, haproxy, python3, curl, and perf for SWITCHES):
#   benches/load/layers.sh [ROUNDS] [TOLLGATE]   default: 3 rounds, the release build
# Knobs (environment): CONNS=64 SECS=5 SUT_CPU=0 GEN_CPU=1 SWITCHES=0 NGINX_SLOW=1
#   LAYERS="nginx-return hyper tollgate-public tollgate-keyed tollgate-proxied nginx-proxied"
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ROUNDS=${1:-3}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
CONNS=${CONNS:-64}
SECS=${SECS:-5}
SUT_CPU=${SUT_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
SWITCHES=${SWITCHES:-0}
NGINX_SLOW=${NGINX_SLOW:-1}
read -r -a LAYERS <<<"${LAYERS:-nginx-return hyper tollgate-public tollgate-keyed tollgate-proxied nginx-proxied}"
needed=(wrk nginx haproxy python3 curl)
[ "$SWITCHES" = 1 ] && needed+=(perf)
for tool in "${needed[@]}"; do
    command -v "$tool" >/dev/null || { echo "layers.sh: $tool is missing" >&2; exit 1; }
done
(cd "$ROOT" && cargo build --release --bin tollgate --bin tollgate-bench-upstream >&2)
TOLLGATE=${2:-$TARGET/release/tollgate}
HYPER=$TARGET/release/tollgate-bench-upstream

WORK=$(mktemp -d /tmp/tollgate-layers.XXXXXX)
mkdir -p "$WORK/tmp" "$WORK/logs"
cp "$HERE"/{tollgate.toml,tollgate-keys.toml,nginx.conf,keys.nginx.map,haproxy.cfg,keys.haproxy.map} "$WORK/"
# The fixed routes: compare.sh's config up to its upstreams, then fixed-route.toml.
fixed_route() { # auth (true|false) -> the config on stdout
    sed '/^\[\[upstreams\]\]/,$d' "$HERE/tollgate.toml"
    sed "s/^auth = true$/auth = $1/" "$HERE/fixed-route.toml"
}
fixed_route false >"$WORK/public.toml"
fixed_route true >"$WORK/keyed.toml"
# nginx.conf's settings, one server answering itself.
sed -n '1,/keepalive_requests 1000000;/p' "$HERE/nginx.conf" |
    sed 's/^pid nginx.pid;/pid return.pid;/' >"$WORK/return.conf"
cat >>"$WORK/return.conf" <<'EOF'
    server {
        listen 127.0.0.1:8083 reuseport;
        location / {
            return 200 "ok";
        }
    }
}
EOF
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

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

taskset -c "$GEN_CPU" "$HYPER" 127.0.0.1:3000 &
UPSTREAM=$!
PIDS+=("$UPSTREAM")

declare -A PORT=([nginx-return]=8083 [hyper]=8084 [tollgate-public]=8080 [tollgate-keyed]=8080
    [tollgate-proxied]=8080 [nginx-proxied]=8081 [haproxy-proxied]=8082 [nginx-slowed]=8081)
start() { # layer: starts its gateway, the pid in $pid
    local tollgate=(taskset -c "$SUT_CPU" "$TOLLGATE" --log-level warn --config)
    local nginx=(taskset -c "$SUT_CPU" nginx -p "$WORK/" -e stderr -c)
    case $1 in
        nginx-return) (cd "$WORK" && exec "${nginx[@]}" "$WORK/return.conf") & ;;
        hyper) taskset -c "$SUT_CPU" "$HYPER" 127.0.0.1:8084 & ;;
        tollgate-public) (cd "$WORK" && exec "${tollgate[@]}" public.toml) & ;;
        tollgate-keyed) (cd "$WORK" && exec "${tollgate[@]}" keyed.toml) & ;;
        tollgate-proxied) (cd "$WORK" && exec "${tollgate[@]}" tollgate.toml) & ;;
        nginx-proxied) (cd "$WORK" && exec "${nginx[@]}" "$WORK/nginx.conf") & ;;
        haproxy-proxied) (cd "$WORK" && exec taskset -c "$SUT_CPU" haproxy -f haproxy.cfg) & ;;
        nginx-slowed) (cd "$WORK" && exec "${nginx[@]}" "$WORK/nginx-slowed.conf") & ;;
        *) echo "layers.sh: no layer $1" >&2; exit 1 ;;
    esac
    pid=$!
    PIDS+=("$pid")
}
# utime and stime of a process, in clock ticks (nginx serves from its worker, a child).
ticks() { awk '{sub(/^.*\) /, ""); print $12, $13}' "/proc/$1/stat"; }
# perf says "<not counted>" for a process that never ran in the window: none.
switches() { awk -F, '$3 == "context-switches" {print ($1 ~ /^[0-9]+$/ ? $1 : 0)}' "$1"; }

header='layer\tround\trequests\tuser us/req\tkernel us/req'
[ "$SWITCHES" = 1 ] && header+='\tupstream cs/req\twrk cs/req'
printf "$header\n"
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
        counted=()
        if [ "$SWITCHES" = 1 ]; then
            perf stat -x, -e context-switches -p "$UPSTREAM" -o "$WORK/up.txt" -- sleep "$SECS" &
            perf_pid=$!
            counted=(perf stat "-x," -e context-switches -o "$WORK/wrk.txt" --)
        fi
        before=$(ticks "$serving")
        json=$("${counted[@]}" "${wrk[@]}" -d"${SECS}s" "$url" | grep '^{')
        after=$(ticks "$serving")
        peers=""
        if [ "$SWITCHES" = 1 ]; then
            wait "$perf_pid"
            peers="$(switches "$WORK/up.txt") $(switches "$WORK/wrk.txt")"
        fi
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        # Every answer is a 200; anything else would measure another path.
        line=$(python3 -c 'import json, os, sys; g, r, js, b, a, peers = sys.argv[1:7]
d = json.loads(js)
n = d["requests"]
if d["non2xx"] or d["errors"]:
    sys.exit("layers.sh: %s: %d answers not 2xx, %d socket errors" % (g, d["non2xx"], d["errors"]))
tick = 1e6 / os.sysconf("SC_CLK_TCK")
cpu = [(int(y) - int(x)) * tick / n for x, y in zip(b.split(), a.split())]
cs = "".join("\t%.3f" % (int(c) / n) for c in peers.split())
print(f"{g}\t{r}\t{n}\t{cpu[0]:.2f}\t{cpu[1]:.2f}{cs}")' \
            "$layer" "$round" "$json" "$before" "$after" "$peers")
        echo "$line" | tee -a "$RESULTS"
        sleep 0.5
    done
done
python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    g, _, *figures = line.split("\t")
    rows.setdefault(g, []).append([float(f) for f in figures])
print("\nmedians: layer, requests per run, user and kernel CPU per request (us)"
      "[, upstream and wrk context switches per request]")
for g, runs in rows.items():
    med = [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))]
    print("\t".join([g, "%.0f" % med[0], "%.2f" % med[1], "%.2f" % med[2]]
                    + ["%.3f" % m for m in med[3:]]))
PY
