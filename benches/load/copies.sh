#!/usr/bin/env bash
# Where tollgate copies memory per proxied request: every `memcpy` of 64 bytes or more under
# compare.sh's load (1000 keys rotated, keep-alive, every request charged and proxied to
# tollgate-bench-upstream), counted by size and call site and divided by the requests served.
#
# A future is moved with a `memcpy` of its whole size, whatever state it is in: when rustc
# does not make an awaited future in place, the copy shows here as a large size at the
# `.await` that made it. A small preloaded library wraps libc's `memcpy` and counts while the
# gateway runs on its own (no valgrind); addr2line names each call site.
#
# Usage (from anywhere; needs cc, wrk, addr2line):
#   benches/load/copies.sh [TOLLGATE]           default: the release build
# Knobs (environment): SECS=3 CONNS=16 TOP=20 (call sites listed, largest bytes first)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SECS=${SECS:-3}
CONNS=${CONNS:-16}
TOP=${TOP:-20}
if (($# == 0)); then
    (cd "$ROOT" && cargo build --release --bin tollgate >&2)
    set -- "$TARGET/release/tollgate"
fi
BUILD=$(realpath "$1")
for tool in cc wrk addr2line; do
    command -v "$tool" >/dev/null || { echo "copies.sh: $tool is missing (apt-get install gcc wrk binutils)" >&2; exit 1; }
done
(cd "$ROOT" && cargo build --release --bin tollgate-bench-upstream >&2)

WORK=$(mktemp -d /tmp/tollgate-copies.XXXXXX)
cp "$HERE/tollgate.toml" "$HERE/tollgate-keys.toml" "$WORK/"
# Ports of their own, so a compare.sh or instructions.sh run beside this one is not measured.
sed -i 's/127.0.0.1:8080/127.0.0.1:28080/; s/127.0.0.1:9901/127.0.0.1:29901/; s/127.0.0.1:3000/127.0.0.1:23000/' "$WORK/tollgate.toml"

# Counting starts at SIGUSR1 and is written to copies.<pid> at SIGUSR2: the warm-up and the
# start are left out.
cat >"$WORK/copies.c" <<'C'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#define SLOTS 65536
static uintptr_t site[SLOTS];
static size_t size[SLOTS];
static unsigned long count[SLOTS];
static volatile sig_atomic_t on;
static void *(*real)(void *, const void *, size_t);
static void start(int sig) { (void)sig; memset(count, 0, sizeof count); on = 1; }
static void dump(int sig) {
    (void)sig;
    on = 0;
    char name[64], line[96];
    snprintf(name, sizeof name, "copies.%d", (int)getpid());
    int fd = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    for (int i = 0; i < SLOTS; i++)
        if (count[i]) write(fd, line, snprintf(line, sizeof line, "%lx %zu %lu\n", (unsigned long)site[i], size[i], count[i]));
    close(fd);
}
__attribute__((constructor)) static void init(void) {
    real = dlsym(RTLD_NEXT, "memcpy");
    signal(SIGUSR1, start);
    signal(SIGUSR2, dump);
}
void *memcpy(void *d, const void *s, size_t n) {
    if (on && n >= 64) {
        uintptr_t at = (uintptr_t)__builtin_return_address(0);
        size_t h = (size_t)((at * 0x9E3779B97F4A7C15ull ^ n * 31) >> 48);
        for (int p = 0; p < 64; p++) {
            size_t i = (h + p) & (SLOTS - 1);
            if (count[i] == 0) { site[i] = at; size[i] = n; }
            if (site[i] == at && size[i] == n) { count[i]++; break; }
        }
    }
    return real(d, s, n);
}
C
cc -O2 -shared -fPIC -o "$WORK/copies.so" "$WORK/copies.c" -ldl

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

"$TARGET/release/tollgate-bench-upstream" 127.0.0.1:23000 &
PIDS+=($!)
(cd "$WORK" && LD_PRELOAD="$WORK/copies.so" exec "$BUILD" --config tollgate.toml --log-level warn) &
pid=$!
PIDS+=("$pid")
for _ in $(seq 100); do
    curl -s -o /dev/null http://127.0.0.1:28080/ && break
    sleep 0.1
done
load() { # seconds
    wrk -t1 -c"$CONNS" -d"$1s" -s "$HERE/keys.lua" http://127.0.0.1:28080/v1/bench | grep '^{'
}
load 2 >/dev/null # warm-up: every connection made, every key seen
kill -USR1 "$pid"
requests=$(load "$SECS" | python3 -c 'import json, sys; print(json.load(sys.stdin)["requests"])')
kill -USR2 "$pid"
sleep 0.5
base=$(grep -m1 " $BUILD\$" "/proc/$pid/maps" | cut -d- -f1)
counts="$WORK/copies.$pid"

awk -v n="$requests" '{b += $2 * $3; c += $3} END {printf "%d requests: %.0f bytes in %.1f copies of 64 bytes or more per request\n", n, b / n, c / n}' "$counts"
printf 'bytes\tper request\tcall site (innermost first)\n'
awk -v n="$requests" '{printf "%s %s %.2f %.0f\n", $1, $2, $3 / n, $2 * $3 / n}' "$counts" |
    sort -k4 -rn | head -"$TOP" |
    while read -r at bytes per _; do
        where=$(addr2line -f -i -C -e "$BUILD" "$(printf '0x%x' $((0x$at - 0x$base)))" |
            paste -sd' ' | sed 's#[^ ]*/\([^/ ]*:[0-9]*\)#\1#g' | cut -c1-240)
        printf '%s\t%s\t%s\n' "$bytes" "$per" "$where"
    done
