#!/usr/bin/env bash
# Side-by-side cost of one admission decision in two or more builds of benches/hot_path.rs,
# by `perf stat` counts rather than wall-clock time (this shared VM's speed drifts 2x within the
# hour; instruction counts repeat to within 1%, cycles to within about 10% when alternated).
#
#   benches/hot_path_ab.sh TRAFFIC ROUNDS BIN...
#
# TRAFFIC is skewed (Zipf), uniform or few (16 keys, all in cache). Each round runs every BIN
# twice, with and without the decisions (HOT_PATH_PARSE_ONLY), pinned to CPU 1, and prints the
# difference per decision; the last lines list each binary's cycles over the rounds.
#
# To compare with an older commit, build it with today's bench:
#   git worktree add /tmp/old <commit> && cp benches/hot_path.rs /tmp/old/benches/
#   (cd /tmp/old && CARGO_TARGET_DIR=$PWD/target cargo bench --bench hot_path --no-run)
# and pass the two `target/release/deps/hot_path-*` executables (copied aside, the names clash).
set -euo pipefail
traffic=$1 rounds=$2
shift 2
n=3000000
count() {
    local bin=$1
    shift
    perf stat -x, -e instructions:u,cycles:u taskset -c 1 \
        env HOT_PATH_TRAFFIC="$traffic" HOT_PATH_ITERS=$n "$@" "$bin" 2>&1 >/dev/null |
        awk -F, '{printf "%s ", $1} END {print ""}'
}
results=$(
    for _ in $(seq "$rounds"); do
        for bin in "$@"; do
            read -r i0 c0 < <(count "$bin" HOT_PATH_PARSE_ONLY=1)
            read -r i1 c1 < <(count "$bin")
            echo "$(basename "$bin") $traffic instructions $(((i1 - i0) / n)) cycles $(((c1 - c0) / n))"
        done
    done
)
echo "$results"
echo "$results" | awk '{c[$1] = c[$1] " " $6} END {for (b in c) print "cycles per decision", b ":" c[b]}'
