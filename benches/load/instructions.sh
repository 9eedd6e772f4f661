#!/usr/bin/env bash
# User-space instructions per request of one or more tollgate builds, counted by callgrind
# under compare.sh's load (1000 keys rotated, keep-alive, every request charged and proxied to
# tollgate-bench-upstream; or, with PASS=limited, every request over its limit: the 429 path;
# PASS=keyed, a fixed route answered by tollgate itself, the keys as before; PASS=public, that
# route with `auth = false` and no key sent).
#
# Instruction counts repeat to within a fraction of a per cent whatever else the machine is
# doing, where wall-clock CPU figures on a shared VM drift 2x; on VMs where `perf stat` has no
# hardware counters (`perf stat -e instructions true` prints "not supported") this is the
# way to compare builds. Callgrind counts user space only (hyper, tokio, tollgate, libc), not
# the kernel's share, and runs the gateway about 50x slower, so it says nothing about time.
#
# Usage (from anywhere; needs valgrind, wrk, python3):
#   benches/load/instructions.sh [TOLLGATE...]      default: the release build
#   copy each build's target/release/tollgate aside first (the path is reused by every build).
# Knobs (environment): SECS=15 CONNS=16 PASS=proxied|limited|keyed|public
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SECS=${SECS:-15}
CONNS=${CONNS:-16}
PASS=${PASS:-proxied}
if (($# == 0)); then
    (cd "$ROOT" && cargo build --release --bin tollgate >&2)
    set -- "$TARGET/release/tollgate"
fi
for tool in valgrind callgrind_control wrk python3; do
    command -v "$tool" >/dev/null || { echo "instructions.sh: $tool is missing (apt-get install valgrind wrk python3)" >&2; exit 1; }
done
(cd "$ROOT" && cargo build --release --bin tollgate-bench-upstream >&2)

WORK=$(mktemp -d /tmp/tollgate-instructions.XXXXXX)
cp "$HERE/tollgate.toml" "$HERE/tollgate-keys.toml" "$WORK/"
# Ports of their own, so a compare.sh run beside this one is not measured instead.
sed -i 's/127.0.0.1:8080/127.0.0.1:18080/; s/127.0.0.1:9901/127.0.0.1:19901/; s/127.0.0.1:3000/127.0.0.1:13000/' "$WORK/tollgate.toml"
case $PASS in
    limited) sed -i '/BENCH_RPM/s/= [0-9]*/= 1/' "$WORK/tollgate.toml" ;;
    keyed | public)
        # Everything up to the upstreams, then fixed-route.toml.
        sed -i '/^\[\[upstreams\]\]/,$d' "$WORK/tollgate.toml"
        sed "s/^auth = true$/auth = $([[ $PASS == public ]] && echo false || echo true)/" \
            "$HERE/fixed-route.toml" >>"$WORK/tollgate.toml"
        ;;
esac
# A public route still checks a key that is sent: its load sends none.
NO_KEY=$([[ $PASS == public ]] && echo 1 || echo 0)
export NO_KEY
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

"$TARGET/release/tollgate-bench-upstream" 127.0.0.1:13000 &
PIDS+=($!)

wrk_json() { # seconds
    wrk -t1 -c"$CONNS" -d"$1s" -s "$HERE/keys.lua" http://127.0.0.1:18080/v1/bench | grep '^{'
}

printf 'build\tpass\trequests\tinstructions\tper request\n'
for build in "$@"; do
    (cd "$WORK" && exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/dev/null \
        "$build" --config tollgate.toml --log-level warn 2>"$WORK/valgrind.log") &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 300); do
        curl -s -o /dev/null http://127.0.0.1:18080/ && break
        sleep 0.2
    done
    wrk_json 3 >/dev/null # warm-up: every connection made, every key seen
    callgrind_control --instr=on "$pid" >/dev/null 2>&1
    json=$(wrk_json "$SECS")
    callgrind_control --instr=off "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    python3 - "$build" "$PASS" "$json" "$WORK/valgrind.log" <<'PY'
import json, re, sys
build, pass_, js, log = sys.argv[1:]
d = json.loads(js)
# Callgrind's count at exit: what ran while instrumentation was on (the measured window).
ir = int(re.search(r"Collected : (\d+)", open(log).read()).group(1))
expect = "limited" if pass_ == "limited" else "proxied"
bad = d["non2xx"] if expect == "proxied" else d["requests"] - d["non2xx"]
note = "" if bad == 0 and d["errors"] == 0 else "  (%d unexpected statuses, %d socket errors)" % (bad, d["errors"])
print("%s\t%s\t%d\t%d\t%.0f%s" % (build, pass_, d["requests"], ir, ir / d["requests"], note))
PY
done
