#!/usr/bin/env bash
# Soak: a bounded mixed-load run against the release binary, with upstream faults and a reload
# every 10 s, that checks at the end: no crash (alive throughout, exit 0 on SIGTERM), RSS within
# 10% of where it settled, file descriptors back to the baseline, and every request answered,
# counted at the client and at the upstream. Prints a summary table; exits 1 if a check fails.
#
# Usage: benches/soak.sh [SECONDS]   (default 300; CI runs `benches/soak.sh 20` from tests/run.sh)
#        SOAK_SAMPLES=FILE also writes the per-second RSS and fd samples there (CSV).
#
# The load generator and the checks are benches/soak/soak.py (Python standard library); the
# upstream is `tollgate-bench-upstream --faults`. Everything listens on 127.0.0.1 (free ports
# picked at start), in a temporary directory removed on exit, with every child killed on exit.
set -euo pipefail

SECS=${1:-300}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

command -v python3 >/dev/null || { echo "benches/soak.sh: python3 is required" >&2; exit 1; }

echo "== soak: building tollgate and the fault upstream (release)" >&2
(cd "$ROOT" && cargo build --release --quiet --bin tollgate --bin tollgate-bench-upstream)

WORK=$(mktemp -d /tmp/tollgate-soak.XXXXXX)
PY=
cleanup() {
    # Normally soak.py has stopped its children and removed the pid file by now; this covers
    # it being interrupted (the file then lists the children still running).
    if [[ -n $PY ]]; then kill "$PY" 2>/dev/null || true; fi
    if [[ -f $WORK/pids ]]; then
        while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done <"$WORK/pids"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

started=$SECONDS
status=0
# In the background and waited for, so that a signal to this script is handled at once.
python3 "$HERE/soak/soak.py" --seconds "$SECS" --work "$WORK" \
    --tollgate "$ROOT/target/release/tollgate" \
    --upstream "$ROOT/target/release/tollgate-bench-upstream" ${SOAK_SAMPLES:+--samples "$SOAK_SAMPLES"} &
PY=$!
wait "$PY" || status=$?
PY=
echo "== soak: ${SECS} s soak took $((SECONDS - started)) s in all, exit $status" >&2
exit "$status"
