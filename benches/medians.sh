#!/usr/bin/env bash
# Prints the median of every criterion benchmark measured so far (target/criterion/*/new).
# Usage: cargo bench --bench NAME -- --warm-up-time 1 --measurement-time 3 && benches/medians.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
find target/criterion -path '*/new/estimates.json' | sort | while read -r f; do
    name=${f#target/criterion/}
    name=${name%/new/estimates.json}
    python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))["median"]["point_estimate"]; print("%-50s %10.1f ns" % (sys.argv[2], m))' "$f" "$name"
done
