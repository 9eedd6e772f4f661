#!/usr/bin/env bash
# Side-by-side load comparison: direct to a tiny upstream, tollgate, nginx, HAProxy and a small
# Pingora gateway (benches/load/pingora-gateway) doing the same work (API key map -> 401,
# per-key rate limit -> 429, keep-alive proxy), on one machine. Writes benches/load/results.md
# and benches/load/results.svg.
#
# Usage (as root on Debian, from anywhere):  benches/load/compare.sh
# Knobs (environment): RUNS=5 SECS=5 WARMUP=3 CONNS=64 RATE=5000 SUT_CPU=0 GEN_CPU=1,
#   NO_OHA=1 (skip oha), NO_PINGORA=1 (skip the Pingora gateway), TWO_CORE=0 (skip the
#   two-core table), SEG2_SECS=SECS (each two-segment latency run), SEG2_CONNS=1.
#
# Method: the system under test (SUT) runs pinned to SUT_CPU with one worker; the upstream and
# the load generator share GEN_CPU. wrk (closed loop, CONNS keep-alive connections, 1000 keys
# rotated) measures capacity; each SUT's CPU time comes from /proc/<pid>/stat (utime+stime)
# before and after each run, divided by the requests served. Runs are interleaved across the
# SUTs (run 1 of each, then run 2 of each, ...) so drift hits them alike; medians are reported.
# oha (open loop, -q RATE) measures latency at a fixed rate below saturation. A second pass
# sets every limit tiny so every request is answered 429 (the rejection path).
# The two-segment row: every SUT also routes /slow2/ to two_segment_upstream.py (head and body
# in two writes, Nagle on); wrk with SEG2_CONNS connections (closed loop) gives p50/p99 per
# request through each gateway and direct.
# The two-core table (TWO_CORE=1, the default): the same proxied and 429 passes with every
# gateway on all cores (tollgate workers = 0, nginx worker_processes 2, HAProxy nbthread 2,
# Pingora 2 threads), nothing pinned, wrk (2 threads) and the upstream on the same cores.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RUNS=${RUNS:-5}
SECS=${SECS:-5}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-64}
RATE=${RATE:-5000}
SUT_CPU=${SUT_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
TWO_CORE=${TWO_CORE:-1}
SEG2_SECS=${SEG2_SECS:-$SECS}
SEG2_CONNS=${SEG2_CONNS:-1}
COMMAND="benches/load/compare.sh (RUNS=$RUNS SECS=$SECS WARMUP=$WARMUP CONNS=$CONNS RATE=$RATE SUT_CPU=$SUT_CPU GEN_CPU=$GEN_CPU TWO_CORE=$TWO_CORE SEG2_SECS=$SEG2_SECS SEG2_CONNS=$SEG2_CONNS${NO_PINGORA:+ NO_PINGORA=1})"

log() { printf '== %s\n' "$*" >&2; }

# ---- tools ---------------------------------------------------------------------------------
missing=()
# cmake: the Pingora gateway's zlib-ng (libz-ng-sys) builds with it.
for tool in nginx:nginx haproxy:haproxy wrk:wrk python3:python3 curl:curl taskset:util-linux cmake:cmake; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
export PATH="$HOME/.cargo/bin:$PATH"
OHA=oha
if [[ -n ${NO_OHA:-} ]]; then
    OHA=""
elif ! command -v oha >/dev/null; then
    log "installing oha (cargo install oha --locked)"
    cargo install oha --locked || OHA=""
fi
if [[ -n $OHA ]]; then
    OHA_JSON=(--output-format json)
    oha --help | grep -q -- '--output-format' || OHA_JSON=(-j)
fi

WORK=$(mktemp -d /tmp/tollgate-bench.XXXXXX)
RAW=$WORK/raw.tsv
: >"$RAW"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
log "building tollgate and the upstream (release, in $TARGET)"
(cd "$ROOT" && cargo build --release --bin tollgate --bin tollgate-bench-upstream)
TOLLGATE=$TARGET/release/tollgate
UPSTREAM=$TARGET/release/tollgate-bench-upstream

# The Pingora gateway: its own Cargo project (own [workspace], own Cargo.lock) and target dir.
PINGORA=$TARGET/pingora-gateway/release/pingora-gateway
PINGORA_WHY=""  # why there is no Pingora row, if there is none
if [[ -n ${NO_PINGORA:-} ]]; then
    PINGORA_WHY="NO_PINGORA was set"
else
    log "building the Pingora gateway (release, in $TARGET/pingora-gateway)"
    if ! (cd "$HERE/pingora-gateway" && CARGO_TARGET_DIR=$TARGET/pingora-gateway cargo build --release --locked) \
        2>&1 | tee "$WORK/pingora-build.log" >&2; then
        PINGORA_WHY="its build failed: $(grep -m1 -E '^error' "$WORK/pingora-build.log" || tail -n1 "$WORK/pingora-build.log")"
        log "Pingora: no row because $PINGORA_WHY"
    fi
fi
GATEWAYS=(tollgate nginx haproxy)
if [[ -z $PINGORA_WHY ]]; then GATEWAYS+=(pingora); fi

# ---- keys: 1000 deterministic keys, their digests for tollgate, maps for nginx/HAProxy --------
python3 - "$HERE" <<'PY'
import hashlib, sys
d = sys.argv[1]
keys = ["tg_bench_%04d_%s" % (i, hashlib.sha256(b"tollgate-bench-%d" % i).hexdigest()[:24]) for i in range(1000)]
with open(f"{d}/keys.txt", "w") as f:
    f.writelines(k + "\n" for k in keys)
with open(f"{d}/keys.nginx.map", "w") as f:
    f.writelines(f"{k} k{i:04d};\n" for i, k in enumerate(keys))
with open(f"{d}/keys.haproxy.map", "w") as f:
    f.writelines(f"{k} k{i:04d}\n" for i, k in enumerate(keys))
with open(f"{d}/tollgate-keys.toml", "w") as f:
    f.write("# Generated by compare.sh: the sha256 digests of keys.txt.\n")
    for i, k in enumerate(keys):
        f.write(f'\n[[keys]]\nid = "k{i:04d}"\nkey = "sha256:{hashlib.sha256(k.encode()).hexdigest()}"\nplan = "bench"\n')
PY
first_key=$(head -n1 "$HERE/keys.txt")
digest=$(printf '%s' "$first_key" | "$TOLLGATE" hash-key)
grep -qF "$digest" "$HERE/tollgate-keys.toml" || { log "tollgate hash-key disagrees with the generated digests"; exit 1; }

# ---- processes -----------------------------------------------------------------------------
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
        sleep 0.1
    done
    log "nothing answers on port $1"
    exit 1
}

# Every pid of a SUT: the process and its children (nginx's workers).
pids_of() { echo "$1" $(pgrep -P "$1" || true); }
cpu_ticks() {
    local total=0 pid
    for pid in $(pids_of "$1"); do
        # Fields after the ")" of comm: utime is the 12th, stime the 13th.
        read -r -a f < <(sed 's/^.*) //' "/proc/$pid/stat")
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
rss_kib() {
    local total=0 pid
    for pid in $(pids_of "$1"); do
        total=$((total + $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")))
    done
    echo "$total"
}
CLK_TCK=$(getconf CLK_TCK)

# A port already taken (a gateway left running) would have something else measured in a
# system's place: refuse to start.
for port in 3000 3001 8080 8081 8082 8083 9901; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        log "port $port is already in use on 127.0.0.1 (ss -ltnp shows by what); stop it first"
        exit 1
    fi
done

taskset -c "$GEN_CPU" "$UPSTREAM" 127.0.0.1:3000 &
UPSTREAM_PID=$!
taskset -c "$GEN_CPU" python3 "$HERE/two_segment_upstream.py" 127.0.0.1:3001 &
SEG2_PID=$!
PIDS+=("$UPSTREAM_PID" "$SEG2_PID")
wait_port 3000
wait_port 3001

declare -A PORT=([direct]=3000 [tollgate]=8080 [nginx]=8081 [haproxy]=8082 [pingora]=8083)
declare -A PID=([direct]=$UPSTREAM_PID)
# The one-core table: each gateway pinned to SUT_CPU with one worker, the generator on GEN_CPU.
# set_cores 2: the two-core table, two workers each, nothing pinned.
set_cores() {
    CORES=$1
    if ((CORES == 1)); then
        PIN=(taskset -c "$SUT_CPU")
        GEN=(taskset -c "$GEN_CPU")
    else
        PIN=()
        GEN=()
    fi
}
set_cores 1

# start_suts normal|limited: the gateways, from configs in $WORK/$1-$CORES.
start_suts() {
    local mode=$1 dir=$WORK/$1-$CORES limit=60000000
    mkdir -p "$dir/tmp"
    cp "$HERE/keys.nginx.map" "$HERE/keys.haproxy.map" "$HERE/tollgate-keys.toml" "$dir/"
    cp "$HERE/tollgate.toml" "$HERE/nginx.conf" "$HERE/haproxy.cfg" "$dir/"
    if [[ $mode == limited ]]; then
        limit=1
        sed -i '/BENCH_RPM/s/= [0-9]*/= 1/' "$dir/tollgate.toml"
        sed -i '/BENCH_RATE/s|rate=[0-9]*r/s|rate=1r/m|; s/ burst=1000 nodelay//' "$dir/nginx.conf"
        sed -i '/BENCH_RATE/s/gt [0-9]*/gt 1/' "$dir/haproxy.cfg"
    fi
    if ((CORES == 2)); then
        sed -i '/BENCH_WORKERS/s/= 1/= 0/' "$dir/tollgate.toml"
        sed -i '/BENCH_WORKERS/s/worker_processes 1/worker_processes 2/' "$dir/nginx.conf"
        sed -i '/BENCH_WORKERS/s/nbthread 1/nbthread 2/' "$dir/haproxy.cfg"
    fi
    (cd "$dir" && exec "${PIN[@]}" "$TOLLGATE" --config tollgate.toml --log-level warn) &
    PID[tollgate]=$!
    (cd "$dir" && exec "${PIN[@]}" nginx -p "$dir/" -c "$dir/nginx.conf" -e stderr) &
    PID[nginx]=$!
    (cd "$dir" && exec "${PIN[@]}" haproxy -f haproxy.cfg) &
    PID[haproxy]=$!
    PIDS+=("${PID[tollgate]}" "${PID[nginx]}" "${PID[haproxy]}")
    if [[ -z $PINGORA_WHY ]]; then
        (cd "$dir" && exec "${PIN[@]}" "$PINGORA" --listen "127.0.0.1:${PORT[pingora]}" --upstream 127.0.0.1:3000 \
            --upstream2 127.0.0.1:3001 --keys keys.haproxy.map --limit "$limit" --threads "$CORES") &
        PID[pingora]=$!
        PIDS+=("${PID[pingora]}")
    fi
    local sut code path
    for sut in "${GATEWAYS[@]}"; do
        wait_port "${PORT[$sut]}"
        for path in /v1/bench /slow2/bench; do
            code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[$sut]}$path")
            [[ $code == 401 ]] || { log "$sut answered $code to a request without a key, not 401"; exit 1; }
            code=$(curl -s -o /dev/null -w '%{http_code}' -H 'X-API-Key: nope' "http://127.0.0.1:${PORT[$sut]}$path")
            [[ $code == 401 ]] || { log "$sut answered $code to an unknown key, not 401"; exit 1; }
            [[ $mode == limited && $path == /slow2/bench ]] && continue
            code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: $first_key" "http://127.0.0.1:${PORT[$sut]}$path")
            [[ $code == 200 ]] || { log "$sut answered $code to a valid key on $path, not 200"; exit 1; }
        done
        if [[ $mode == limited ]]; then
            code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: $first_key" "http://127.0.0.1:${PORT[$sut]}/v1/bench")
            [[ $code == 429 ]] || { log "$sut answered $code over the limit, not 429"; exit 1; }
        fi
    done
}

stop_suts() {
    local sut
    for sut in "${GATEWAYS[@]}"; do
        kill "${PID[$sut]}" 2>/dev/null || true
        wait "${PID[$sut]}" 2>/dev/null || true
    done
    PIDS=("$UPSTREAM_PID" "$SEG2_PID")
}

wrk_json() { # port seconds
    "${GEN[@]}" wrk -t"$CORES" -c"$CONNS" -d"$2s" -s "$HERE/keys.lua" "http://127.0.0.1:$1/v1/bench" | grep '^{'
}

# measure pass sut run: one wrk run, CPU ticks of the SUT around it, one line in $RAW.
measure() {
    local pass=$1 sut=$2 run=$3 t0 t1 json
    t0=$(cpu_ticks "${PID[$sut]}")
    json=$(wrk_json "${PORT[$sut]}" "$SECS")
    t1=$(cpu_ticks "${PID[$sut]}")
    printf '%s\t%s\t%s\t%s\t%s\n' "$pass" "$sut" "$run" "$((t1 - t0))" "$json" >>"$RAW"
    log "$pass $sut run $run: $json ticks=$((t1 - t0))"
}

throughput_pass() { # pass suts...
    local pass=$1 sut run
    shift
    for sut in "$@"; do wrk_json "${PORT[$sut]}" "$WARMUP" >/dev/null; done
    for run in $(seq "$RUNS"); do
        for sut in "$@"; do measure "$pass" "$sut" "$run"; done
    done
    for sut in "$@"; do printf 'rss\t%s\t%s\t%s\n' "$pass" "$sut" "$(rss_kib "${PID[$sut]}")" >>"$RAW"; done
}

latency_pass() { # suts...
    local sut run out
    for run in $(seq "$RUNS"); do
        for sut in "$@"; do
            if [[ -n $OHA ]]; then
                out=$("${GEN[@]}" oha --no-tui "${OHA_JSON[@]}" --latency-correction -q "$RATE" -c 32 \
                    -z "${SECS}s" -H "X-API-Key: $first_key" "http://127.0.0.1:${PORT[$sut]}/v1/bench" |
                    python3 -c 'import json,sys; d=json.load(sys.stdin); p=d["latencyPercentiles"]; s=d["statusCodeDistribution"]; print("%d %d %s" % (p["p50"]*1e6, p["p99"]*1e6, ",".join("%s:%s" % kv for kv in s.items())))')
            else
                # No oha: closed loop at low concurrency (not a fixed rate).
                out=$("${GEN[@]}" wrk -t1 -c4 -d"${SECS}s" -s "$HERE/keys.lua" "http://127.0.0.1:${PORT[$sut]}/v1/bench" |
                    grep '^{' | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["p50_us"], d["p99_us"], "wrk-c4")')
            fi
            printf 'lat\t%s\t%s\t%s\n' "$sut" "$run" "$out" >>"$RAW"
            log "latency $sut run $run: $out"
        done
    done
}

# seg2_pass suts...: p50/p99 per request through each SUT to the two-segment upstream (/slow2/),
# SEG2_CONNS keep-alive connections, closed loop, the keys rotated as in the other passes.
seg2_pass() {
    local sut run port json
    for run in $(seq "$RUNS"); do
        for sut in "$@"; do
            port=${PORT[$sut]}
            [[ $sut == direct ]] && port=3001
            json=$("${GEN[@]}" wrk -t1 -c"$SEG2_CONNS" -d"${SEG2_SECS}s" -s "$HERE/keys.lua" \
                "http://127.0.0.1:$port/slow2/bench" | grep '^{')
            printf 'seg2\t%s\t%s\t%s\n' "$sut" "$run" "$json" >>"$RAW"
            log "two-segment $sut run $run: $json"
        done
    done
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "pass 1: proxied (every key under its limit), one core each"
start_suts normal
throughput_pass proxied direct "${GATEWAYS[@]}"
log "latency at $RATE req/s"
latency_pass direct "${GATEWAYS[@]}"
log "two-segment upstream: p50/p99 per request, $SEG2_CONNS connection(s)"
seg2_pass direct "${GATEWAYS[@]}"
stop_suts

log "pass 2: every request over its key's limit (429), one core each"
start_suts limited
throughput_pass limited "${GATEWAYS[@]}"
stop_suts

if [[ $TWO_CORE != 0 ]]; then
    set_cores 2
    # The upstream leaves GEN_CPU too: the two-core table pins nothing.
    taskset -a -p -c "$SUT_CPU,$GEN_CPU" "$UPSTREAM_PID" >/dev/null
    log "pass 3: proxied, two cores each, nothing pinned"
    start_suts normal
    throughput_pass proxied-2c direct "${GATEWAYS[@]}"
    stop_suts
    log "pass 4: 429 path, two cores each, nothing pinned"
    start_suts limited
    throughput_pass limited-2c "${GATEWAYS[@]}"
    stop_suts
fi

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report --------------------------------------------------------------------------------
MODEL=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
# The pingora version the gateway was built with, from its Cargo.lock.
V_PINGORA=$(awk '/^name = "pingora"$/ {getline; gsub(/[^0-9.]/, ""); print; exit}' "$HERE/pingora-gateway/Cargo.lock" 2>/dev/null || true)
python3 - "$RAW" "$HERE" "$CLK_TCK" "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)" "$MODEL" "$COMMAND" \
    "$(nginx -v 2>&1 | sed 's/.*nginx\///')" "$(haproxy -v | head -n1 | awk '{print $3}')" \
    "$(wrk -v 2>&1 | head -n1 | awk '{print $2}')" "${OHA:+$(oha --version | awk '{print $2}')}" "$RATE" \
    "$(git -C "$ROOT" describe --always --dirty)" "$LOAD_BEFORE" "$LOAD_AFTER" \
    "$V_PINGORA" "$PINGORA_WHY" "$SEG2_CONNS" "$SEG2_SECS" <<'PY'
import json, statistics, sys
(raw, out, clk, date, ncpu, model, command, v_nginx, v_haproxy, v_wrk, v_oha, rate, git_rev, load_before,
 load_after, v_pingora, pingora_why, seg2_conns, seg2_secs) = sys.argv[1:]
clk = int(clk)
runs, rss, lat, seg2 = {}, {}, {}, {}
for line in open(raw):
    f = line.rstrip("\n").split("\t")
    if f[0] == "rss":
        rss[(f[1], f[2])] = int(f[3])
    elif f[0] == "lat":
        p50, p99, codes = f[3].split(" ")
        lat.setdefault(f[1], []).append((int(p50), int(p99), codes))
    elif f[0] == "seg2":
        seg2.setdefault(f[1], []).append(json.loads(f[3]))
    else:
        pass_, sut, _, ticks, js = f
        d = json.loads(js)
        secs = d["duration_us"] / 1e6
        runs.setdefault((pass_, sut), []).append({
            "rps": d["requests"] / secs,
            "cpu": int(ticks) * 1e6 / clk / d["requests"],
            "requests": d["requests"],
            "non2xx": d["non2xx"],
            "errors": d["errors"],
        })

med = lambda xs: statistics.median(xs)
def m(pass_, sut, k):
    return med([r[k] for r in runs[(pass_, sut)]])

gateways = [s for s in ("tollgate", "nginx", "haproxy", "pingora") if ("proxied", s) in runs]
suts = ["direct"] + gateways
two_core = ("proxied-2c", "direct") in runs
names = {"direct": "direct (no proxy)", "tollgate": "tollgate", "nginx": "nginx", "haproxy": "HAProxy", "pingora": "Pingora"}
lp50 = {s: med([x[0] for x in lat[s]]) for s in lat}
lp99 = {s: med([x[1] for x in lat[s]]) for s in lat}
codes = {s: lat[s][0][2] for s in lat}
fixed_rate = bool(v_oha)

def throughput_rows(proxied, limited, latency):
    rows = []
    head = "| | req/s | vs direct | vs nginx | CPU µs/req | CPU vs nginx |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: |"
    if latency:
        head += " p50 / p99 at %s req/s | added p50 / p99 |" % rate if fixed_rate else " p50 / p99, wrk -c4 | added p50 / p99 |"
        rule += " ---: | ---: |"
    head += " RSS MiB | 429 path req/s | 429 path CPU µs/req | 429 req/s ÷ proxied |"
    rule += " ---: | ---: | ---: | ---: |"
    rows += [head, rule]
    for s in suts:
        rps = m(proxied, s, "rps")
        cpu = m(proxied, s, "cpu")
        c = [names[s], "%.0f" % rps, "%.2fx" % (rps / m(proxied, "direct", "rps")), "%.2fx" % (rps / m(proxied, "nginx", "rps"))]
        if s == "direct":
            c += ["(upstream %.1f)" % cpu, ""]
            if latency:
                c += ["%d / %d µs" % (lp50[s], lp99[s]), ""]
            c += ["%.1f" % (rss[(proxied, s)] / 1024), "", "", ""]
        else:
            lim_rps = m(limited, s, "rps")
            c += ["%.1f" % cpu, "%.2fx" % (cpu / m(proxied, "nginx", "cpu"))]
            if latency:
                c += ["%d / %d µs" % (lp50[s], lp99[s]),
                      "+%d / +%d µs" % (lp50[s] - lp50["direct"], lp99[s] - lp99["direct"])]
            c += ["%.1f" % (rss[(proxied, s)] / 1024),
                  "%.0f" % lim_rps, "%.1f" % m(limited, s, "cpu"), "%.2fx" % (lim_rps / rps)]
        rows.append("| " + " | ".join(c) + " |")
    return rows

def fmt_us(us):
    return "%.2f ms" % (us / 1000) if us >= 1000 else "%d µs" % us

seg2_rows = ["| | p50 | p99 | requests per run (median) | non-2xx |", "| --- | ---: | ---: | ---: | ---: |"]
for s in suts:
    if s not in seg2:
        continue
    xs = seg2[s]
    seg2_rows.append("| %s | %s | %s | %d | %d |" % (
        names[s], fmt_us(med([x["p50_us"] for x in xs])), fmt_us(med([x["p99_us"] for x in xs])),
        med([x["requests"] for x in xs]), sum(x["non2xx"] for x in xs)))

checks = []
for s in suts:
    for pass_ in ("proxied", "limited", "proxied-2c", "limited-2c"):
        if (pass_, s) not in runs:
            continue
        rs = runs[(pass_, s)]
        non2xx = sum(r["non2xx"] for r in rs)
        checks.append("%s %s: %d of %d non-2xx (%.2f%%), %d socket errors" % (
            s, pass_, non2xx, sum(r["requests"] for r in rs), 100 * non2xx / sum(r["requests"] for r in rs),
            sum(r["errors"] for r in rs)))

def per_run(pass_, s, k, fmt):
    return ", ".join(fmt % r[k] for r in runs[(pass_, s)])

md = []
md.append("# Load comparison: %s\n" % " vs ".join(names[s] for s in gateways))
md.append("Generated by `benches/load/compare.sh`; do not edit by hand.\n")
md.append("- date: %s" % date)
md.append("- machine: %s CPUs, %s" % (ncpu, model))
md.append("- command: `%s`" % command)
md.append("- load average (1/5/15 min) before: %s, after: %s (anything else running shares the CPUs)" % (load_before, load_after))
md.append("- tollgate: commit %s (release build)" % git_rev)
md.append("- versions: nginx %s, HAProxy %s, %swrk %s, oha %s" % (
    v_nginx, v_haproxy, "Pingora %s (benches/load/pingora-gateway, no TLS features), " % v_pingora if "pingora" in gateways else "",
    v_wrk, v_oha or "(not installed)"))
if pingora_why:
    md.append("- Pingora: no row because %s." % pingora_why)
md.append("- method: auth (1000 API keys, rotated per request by wrk) + per-key rate limit + keep-alive proxy to a one-thread"
          " hyper upstream; no access logs; warm-up, then the runs interleaved across the gateways (run 1 of each, then"
          " run 2 of each, ...); medians."
          " CPU µs/req = utime+stime of the gateway's processes from /proc/<pid>/stat over a run, divided by its requests."
          " The 429 path: every key's limit set to 1 per minute, so (after warm-up) every request is rejected"
          " (Pingora's limit counts fixed one-minute windows, so at each window's start every key's first request passes).")
md.append("- one core: each gateway pinned to one CPU with one worker/thread, upstream and load generator (wrk, 1 thread) on the other.")
if two_core:
    md.append("- two cores: tollgate `workers = 0`, nginx `worker_processes 2`, HAProxy `nbthread 2`, Pingora `threads: 2`;"
              " nothing pinned, the upstream and the load generator (wrk, 2 threads) on the same two CPUs.")
if fixed_rate:
    md.append("- latency: oha open loop at a fixed %s req/s (`-q %s --latency-correction`, one key), added = gateway minus direct." % (rate, rate))
else:
    md.append("- latency: oha was not installed, so latency is wrk closed loop with 4 connections (not a fixed rate).")
md.append("- two-segment upstream: `two_segment_upstream.py` writes each response's head and body in two writes with Nagle on;"
          " every gateway routes `/slow2/` to it over reused keep-alive connections; wrk closed loop, %s connection(s),"
          " %s s per run; placed as in the one-core table (gateway on its CPU, wrk and the upstreams on the other)." % (seg2_conns, seg2_secs))
md.append("")
md.append("## One core each\n")
md += throughput_rows("proxied", "limited", True)
md.append("")
if two_core:
    md.append("## Two cores each (nothing pinned, generator and upstream on the same cores)\n")
    md += throughput_rows("proxied-2c", "limited-2c", False)
    md.append("")
md.append("## Two-segment upstream: p50 / p99 per request\n")
md += seg2_rows
md.append("")
for title, pass_ in (("one core", "proxied"), ("two cores", "proxied-2c")):
    if (pass_, "direct") not in runs:
        continue
    md.append("Per run (req/s, proxied, %s): " % title + "; ".join("%s %s" % (s, per_run(pass_, s, "rps", "%.0f")) for s in suts))
    md.append("")
    md.append("Per run (CPU µs/req, proxied, %s): " % title + "; ".join("%s %s" % (s, per_run(pass_, s, "cpu", "%.1f")) for s in gateways))
    md.append("")
    lim = pass_.replace("proxied", "limited")
    md.append("Per run (CPU µs/req, 429 path, %s): " % title + "; ".join("%s %s" % (s, per_run(lim, s, "cpu", "%.1f")) for s in gateways))
    md.append("")
md.append("Per run (two-segment p50 µs): " + "; ".join("%s %s" % (s, ", ".join("%d" % x["p50_us"] for x in seg2[s])) for s in suts if s in seg2))
md.append("")
md.append("Sanity: " + "; ".join(checks) + ". Latency pass status codes: " + "; ".join("%s %s" % (s, codes[s]) for s in suts) + ".")
md.append("")
md.append("![chart](results.svg)")
open(f"{out}/results.md", "w").write("\n".join(md) + "\n")

# ---- SVG: panels of horizontal bars ----
colors = {"direct": "#9e9e9e", "tollgate": "#1f77b4", "nginx": "#2ca02c", "haproxy": "#d62728", "pingora": "#ff7f0e"}
panels = [
    ("One core: throughput, proxied (req/s, higher is better)", [(s, m("proxied", s, "rps")) for s in suts], "%.0f"),
    ("One core: throughput, 429 path (req/s, higher is better)", [(s, m("limited", s, "rps")) for s in gateways], "%.0f"),
    ("One core: CPU per request, proxied (µs, lower is better)", [(s, m("proxied", s, "cpu")) for s in gateways], "%.1f"),
    ("One core: CPU per request, 429 path (µs, lower is better)", [(s, m("limited", s, "cpu")) for s in gateways], "%.1f"),
    ("One core: added p99 latency at %s req/s (µs, lower is better)" % rate if fixed_rate else "One core: added p99 latency, closed loop, 4 connections (µs)",
     [(s, max(0, lp99[s] - lp99["direct"])) for s in gateways], "%.0f"),
]
if two_core:
    panels += [
        ("Two cores: throughput, proxied (req/s, higher is better)", [(s, m("proxied-2c", s, "rps")) for s in suts], "%.0f"),
        ("Two cores: throughput, 429 path (req/s, higher is better)", [(s, m("limited-2c", s, "rps")) for s in gateways], "%.0f"),
        ("Two cores: CPU per request, proxied (µs, lower is better)", [(s, m("proxied-2c", s, "cpu")) for s in gateways], "%.1f"),
    ]
panels.append(("Two-segment upstream: p50 per request (ms, lower is better)",
                [(s, med([x["p50_us"] for x in seg2[s]]) / 1000) for s in suts if s in seg2], "%.2f"))
W, label_w, bar_h, gap = 760, 150, 18, 6
y = 50
body = []
for title, bars, fmt in panels:
    body.append('<text x="10" y="%d" font-weight="bold">%s</text>' % (y, title))
    y += 10
    top = max(v for _, v in bars) or 1
    for s, v in bars:
        w = (W - label_w - 90) * v / top
        body.append('<text x="%d" y="%d" text-anchor="end">%s</text>' % (label_w - 8, y + 13, names[s]))
        body.append('<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>' % (label_w, y, w, bar_h, colors[s]))
        body.append('<text x="%.1f" y="%d">%s</text>' % (label_w + w + 5, y + 13, fmt % v))
        y += bar_h + gap
    y += 22
head = '<text x="10" y="22" font-size="15" font-weight="bold">%s: auth + per-key limit + proxy</text>' % " vs ".join(names[s] for s in gateways)
esc = lambda t: t.replace("&", "&amp;").replace("<", "&lt;")
foot = ('<text x="10" y="%d" font-size="11" fill="#555">%s · %s CPUs, %s</text>\n'
        '<text x="10" y="%d" font-size="10" fill="#555">%s</text>') % (y, date, ncpu, esc(model), y + 15, esc(command))
svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="13">\n'
       '<rect width="100%%" height="100%%" fill="white"/>\n%s\n%s\n%s\n</svg>\n') % (W, y + 27, head, "\n".join(body), foot)
open(f"{out}/results.svg", "w").write(svg)
print("\n".join(md))
PY
log "wrote $HERE/results.md and $HERE/results.svg (raw data: $RAW)"
