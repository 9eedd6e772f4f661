#!/usr/bin/env bash
# RSS of tollgate across rounds of ~10,000 concurrent HTTP/2 streams, and after idling.
#
# Usage (as root on Debian, from anywhere):  benches/load/h2_memory.sh
# Knobs (environment):
#   ROUNDS=3 CONNS=100 STREAMS=100 REQUESTS=20000  h2load per round: CONNS h2c connections
#                                                  with STREAMS streams each in flight
#                                                  (CONNS*STREAMS concurrent), REQUESTS in all
#   IDLE=30                                        seconds of idling before the last reading
#   TARGET=respond|upstream                        a fixed-response route, or a proxied route
#                                                  to tollgate-bench-upstream
#   TOLLGATE_BIN=path                              a built binary (default: cargo build --release)
#   GW_ENV="MALLOC_ARENA_MAX=2"                    environment for the gateway only
#   TRIM=1                                         after the idle reading, call glibc's
#                                                  malloc_trim(0) in the process (gdb) and read
#                                                  again: what the allocator held, free
#   LOG_LEVEL=warn GW_LOG=path                     the gateway's log filter; keep its log at path
#   PORT=18080 ADMIN_PORT=19901 UP_PORT=13000      127.0.0.1 ports
#
# Prints one line per reading: `<label> VmRSS=<KiB> RssAnon=<KiB>`. Every h2load round is
# bounded by its request count and by `timeout 60`; all traffic goes to 127.0.0.1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-100}
STREAMS=${STREAMS:-100}
REQUESTS=${REQUESTS:-20000}
IDLE=${IDLE:-30}
TARGET=${TARGET:-respond}
PORT=${PORT:-18080}
ADMIN_PORT=${ADMIN_PORT:-19901}
UP_PORT=${UP_PORT:-13000}

log() { printf '== %s\n' "$*" >&2; }

command -v h2load >/dev/null || {
    log "installing nghttp2-client (h2load)"
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nghttp2-client
}
if [[ -n ${TRIM:-} ]] && ! command -v gdb >/dev/null; then
    log "installing gdb (TRIM=1)"
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y gdb
fi

if [[ -z ${TOLLGATE_BIN:-} ]]; then
    log "building tollgate and the upstream (release)"
    (cd "$ROOT" && cargo build --release --bin tollgate --bin tollgate-bench-upstream)
    TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
    TOLLGATE_BIN=$TARGET_DIR/release/tollgate
    UPSTREAM_BIN=${UPSTREAM_BIN:-$TARGET_DIR/release/tollgate-bench-upstream}
fi

WORK=$(mktemp -d /tmp/tollgate-h2mem.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -n ${GW_LOG:-} ]] && cp "$WORK/gw.log" "$GW_LOG"
    rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/gw.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
workers = 2

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[limits.ip_throttle]             # off in effect: every stream is served, none blocked
rejections = 2000000000
window = "1s"
block_for = "1s"

[plans.anonymous]
requests_per_minute = 60000000

[[upstreams]]
name = "up"
url = "http://127.0.0.1:$UP_PORT"

[[routes]]
prefix = "/up/"
upstream = "up"
auth = false

[[routes]]
prefix = "/"
auth = false
respond = { status = 200, body = "ok" }
EOF

path=/x
if [[ $TARGET == upstream ]]; then
    "${UPSTREAM_BIN:?set UPSTREAM_BIN with TOLLGATE_BIN for TARGET=upstream}" "127.0.0.1:$UP_PORT" &
    PIDS+=($!)
    path=/up/x
fi

env ${GW_ENV:-} "$TOLLGATE_BIN" --config "$WORK/gw.toml" --log-format json --log-level "${LOG_LEVEL:-warn}" 2>"$WORK/gw.log" &
GW=$!
PIDS+=("$GW")
for _ in $(seq 50); do
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done

reading() {
    awk -v label="$1" '/^VmRSS:/{r=$2} /^RssAnon:/{a=$2} END{printf "%-10s VmRSS=%d RssAnon=%d\n", label, r, a}' \
        "/proc/$GW/status"
}

log "gateway pid $GW ${GW_ENV:+($GW_ENV) }target=$TARGET: $ROUNDS rounds of h2load -c $CONNS -m $STREAMS -n $REQUESTS"
reading start
for round in $(seq "$ROUNDS"); do
    timeout 60 h2load -n "$REQUESTS" -c "$CONNS" -m "$STREAMS" "http://127.0.0.1:$PORT$path" \
        >"$WORK/h2load.$round" 2>&1 || true
    grep -E '^status codes' "$WORK/h2load.$round" | sed "s/^/   round $round: /" >&2
    reading "round$round"
done
sleep "$IDLE"
reading "idle${IDLE}s"
if [[ -n ${TRIM:-} ]]; then
    gdb -p "$GW" -batch -ex 'call (int) malloc_trim(0)' >/dev/null 2>&1 || log "gdb malloc_trim failed"
    reading trimmed
fi
