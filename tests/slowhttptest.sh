#!/usr/bin/env bash
# Debian's slowhttptest against a release tollgate: slow headers (-H, slowloris), slow body
# (-B, R-U-Dead-Yet) and slow read (-X). Prints, per mode, slowhttptest's "service available"
# verdict through the run and what the gateway did with the slow connections.
# Not run by CI (several minutes, and it needs root for apt-get the first time).
#
# Usage (as root on Debian, from anywhere):  tests/slowhttptest.sh
# Knobs (environment): CONNS=1000 RATE=200 LEN=60 (seconds per mode) INTERVAL=10 (seconds
# between follow-up bytes) PROBE=3 (seconds slowhttptest's probe request may take)
# LARGE_CONNS=200 (connections of the slow-read-large mode)
# MODES="H B X XL" (which runs: slow headers, slow body, slow read, slow read large)
# PORT=18080 ADMIN_PORT=19901 UPSTREAM_PORT=13000 SINK_PORT=13001
#
# Upstreams: tollgate-bench-upstream (answers `ok` at once) behind `/`, and for the slow-body
# mode a small Python server behind `/upload` that reads the whole body before answering, as
# a real API would (the bench upstream answers without reading, and tollgate then closes the
# slow connection at once, which would test nothing).
#
# tollgate runs with SPEC's default timeouts (header_read_timeout 10s, body_read_timeout 30s,
# idle_timeout 60s), so the figures are those of an out-of-the-box config.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CONNS=${CONNS:-1000}
RATE=${RATE:-200}
LEN=${LEN:-60}
INTERVAL=${INTERVAL:-10}
PROBE=${PROBE:-3}
LARGE_CONNS=${LARGE_CONNS:-200}
MODES=${MODES:-H B X XL}
PORT=${PORT:-18080}
ADMIN_PORT=${ADMIN_PORT:-19901}
UPSTREAM_PORT=${UPSTREAM_PORT:-13000}
SINK_PORT=${SINK_PORT:-13001}

log() { printf '== %s\n' "$*" >&2; }

if ! command -v slowhttptest >/dev/null; then
    log "installing slowhttptest (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slowhttptest
fi
# Each slow connection is a file descriptor in slowhttptest and in tollgate.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < CONNS * 2 + 100)); then
    log "the fd limit ($(ulimit -n)) is low for CONNS=$CONNS; lower CONNS or raise it"
fi

log "building tollgate and the upstream (release)"
(cd "$ROOT" && cargo build --release --quiet --bin tollgate --bin tollgate-bench-upstream)
TOLLGATE=$ROOT/target/release/tollgate
UPSTREAM=$ROOT/target/release/tollgate-bench-upstream

WORK=$(mktemp -d /tmp/tollgate-slowhttptest.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    log "nothing listens on port $1"
    exit 1
}

# Fixed responses for the slow-read modes. slow-read asks for /big (256 KiB) 3 times per
# connection: the kernel's send buffer (tcp_wmem, up to 4 MiB) takes all of it, tollgate's
# writes complete, and the connection is idle to tollgate. slow-read-large asks for /huge
# (1 MiB) 8 times, more than the kernel takes, so tollgate's own writes block and
# body_read_timeout is what closes the connection.
BIG=$(head -c 262144 /dev/zero | tr '\0' 'x')
HUGE=$(head -c 1048576 /dev/zero | tr '\0' 'x')
cat >"$WORK/tollgate.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
header_read_timeout = "10s"
body_read_timeout = "30s"
idle_timeout = "60s"
max_connections = 10000

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[[upstreams]]
name = "bench"
url = "http://127.0.0.1:$UPSTREAM_PORT"

[[upstreams]]
name = "sink"
url = "http://127.0.0.1:$SINK_PORT"

[[routes]]
prefix = "/upload"
upstream = "sink"
auth = false

[[routes]]
prefix = "/big"
auth = false
respond = { status = 200, body = "$BIG", content_type = "text/plain" }

[[routes]]
prefix = "/huge"
auth = false
respond = { status = 200, body = "$HUGE", content_type = "text/plain" }

[[routes]]
prefix = "/"
upstream = "bench"
auth = false
EOF
"$TOLLGATE" check --config "$WORK/tollgate.toml" >/dev/null

"$UPSTREAM" "127.0.0.1:$UPSTREAM_PORT" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
python3 - "$SINK_PORT" >"$WORK/sink.log" 2>&1 <<'PY' &
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 4096
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
PIDS+=($!)
"$TOLLGATE" --config "$WORK/tollgate.toml" --log-format json --log-level warn \
    >"$WORK/tollgate.log" 2>&1 &
TOLLGATE_PID=$!
PIDS+=("$TOLLGATE_PID")
wait_port "$UPSTREAM_PORT"
wait_port "$SINK_PORT"
wait_port "$PORT"

# Connections to tollgate's port, from tollgate's side.
gateway_conns() { ss -Htn state established "( sport = :$PORT )" | wc -l; }

# Waits (up to 90 s) until tollgate holds no client connection, so each mode starts clean.
settle() {
    for _ in $(seq 90); do
        (($(gateway_conns) == 0)) && return 0
        sleep 1
    done
    log "tollgate still holds $(gateway_conns) client connections"
}

# run MODE NAME CONNS URL EXTRA...: one slowhttptest run; prints its verdict line.
run() {
    local mode=$1 name=$2 conns=$3 url=$4
    shift 4
    local out="$WORK/$name"
    settle
    log "slowhttptest $mode ($name): $conns connections at $RATE/s for ${LEN}s, probe ${PROBE}s"
    local samples="$WORK/$name.conns"
    : >"$samples"
    (
        while kill -0 "$TOLLGATE_PID" 2>/dev/null; do
            gateway_conns >>"$samples"
            sleep 1
        done
    ) &
    local sampler=$!
    slowhttptest "$mode" -c "$conns" -r "$RATE" -l "$LEN" -p "$PROBE" -g -o "$out" \
        -u "$url" "$@" >"$out.log" 2>&1 || true
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    local alive=up
    kill -0 "$TOLLGATE_PID" 2>/dev/null || alive=DEAD
    # The CSV's last column is nonzero while the probe request is answered in time.
    python3 - "$out.csv" "$name" "$samples" "$alive" <<'PY'
import csv, sys
path, name, samples, alive = sys.argv[1:5]
rows = list(csv.DictReader(open(path)))
up = [r for r in rows if int(r["Service Available"]) > 0]
down = [int(r["Seconds"]) for r in rows if int(r["Service Available"]) == 0]
max_connected = max(int(r["Connected"]) for r in rows)
closed = int(rows[-1]["Closed"])
held = [int(line) for line in open(samples) if line.strip()]
verdict = "service available throughout" if not down else f"service UNAVAILABLE at seconds {down}"
print(f"{name}: {verdict} ({len(up)}/{len(rows)} one-second samples YES); test ended at "
      f"{rows[-1]['Seconds']} s; slowhttptest saw at most {max_connected} connected and "
      f"{closed} closed by the server; tollgate {alive}")
print(f"  tollgate's client connections every 5 s: {' '.join(str(n) for n in held[::5])}")
PY
}

RESULTS=$WORK/results.txt
wants() { [[ " $MODES " == *" $1 "* ]]; }
{
    if wants H; then run -H slow-headers "$CONNS" "http://127.0.0.1:$PORT/" -i "$INTERVAL"; fi
    if wants B; then run -B slow-body "$CONNS" "http://127.0.0.1:$PORT/upload" -i "$INTERVAL" -s 8192; fi
    if wants X; then run -X slow-read "$CONNS" "http://127.0.0.1:$PORT/big" -k 3 -n 5 -w 512 -y 1024 -z 32; fi
    if wants XL; then run -X slow-read-large "$LARGE_CONNS" "http://127.0.0.1:$PORT/huge" -k 8 -n 5 -w 512 -y 1024 -z 32; fi
} | tee "$RESULTS"

# A normal request still works after all of them.
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT" && printf 'GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n' >&3 && head -c 12 <&3 | grep -q '200'); then
    echo "after the runs: a normal request gets 200" | tee -a "$RESULTS"
else
    echo "after the runs: a normal request FAILED" | tee -a "$RESULTS"
fi
log "reports (csv, html, logs) in $WORK"
