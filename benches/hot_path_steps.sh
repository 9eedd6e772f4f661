#!/usr/bin/env bash
# Where one admission decision's cost goes: runs benches/hot_path.rs stopped after each step
# (HOT_PATH_UPTO) under `perf stat`, pinned to CPU 1, and prints the cost of each step per
# decision (the parsing, run alone, is subtracted). Instruction counts repeat to within 1%;
# cycles swing by 20% or more on this shared VM, so each round prints its own figures and the
# last lines give the medians over the rounds.
#
#   benches/hot_path_steps.sh TRAFFIC ROUNDS [BIN]
#
# TRAFFIC is skewed (Zipf), uniform or few (16 keys, all in cache). BIN defaults to the
# executable `cargo bench --bench hot_path --no-run` builds.
set -euo pipefail
traffic=$1 rounds=$2
bin=${3:-$(cargo bench --bench hot_path --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*hot_path[^"]*\)".*/\1/p' | tail -1)}
n=2000000
count() {
    perf stat -x, -e instructions:u,cycles:u taskset -c 1 \
        env HOT_PATH_TRAFFIC="$traffic" HOT_PATH_ITERS=$n "$@" "$bin" 2>&1 >/dev/null |
        awk -F, '{printf "%s ", $1} END {print ""}'
}
steps="authenticate charge inserts decision"
rows=$(
    for _ in $(seq "$rounds"); do
        read -r i0 c0 < <(count HOT_PATH_PARSE_ONLY=1)
        pi=$i0 pc=$c0
        line=""
        for step in $steps; do
            upto=$step
            [ "$step" = decision ] && upto=
            read -r i c < <(count HOT_PATH_UPTO="$upto")
            # `inserts` replaces the real header building, so the last step is measured
            # from `charge`, not from `inserts`.
            if [ "$step" = decision ]; then
                line="$line $step $(((i - ci) / n)) $(((c - cc) / n)) total $(((i - i0) / n)) $(((c - c0) / n))"
            else
                line="$line $step $(((i - pi) / n)) $(((c - pc) / n))"
            fi
            if [ "$step" = charge ]; then ci=$i cc=$c; fi
            if [ "$step" != inserts ]; then pi=$i pc=$c; fi
        done
        echo "$line"
    done
)
echo "per decision, $traffic traffic: step instructions cycles"
echo "$rows"
echo "$rows" | awk '
    { for (f = 1; f <= NF; f += 3) { name[f] = $f; i[f, NR] = $(f + 1); c[f, NR] = $(f + 2) } }
    function median(a, f, n,    k, v, t, j) {
        for (k = 1; k <= n; k++) v[k] = a[f, k]
        for (k = 2; k <= n; k++) { t = v[k]; for (j = k - 1; j > 0 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
        return v[int((n + 1) / 2)]
    }
    END {
        printf "median:"
        for (f = 1; f <= NF; f += 3) printf " %s %d %d", name[f], median(i, f, NR), median(c, f, NR)
        print ""
    }'
