#!/usr/bin/env bash
# The test command of tollgate: formatting, lints, every test, doc tests, a 20 s soak.
# Works on a fresh Debian machine as root: installs what the tests need, then runs them.
# Usage: tests/run.sh   (from anywhere; CI runs it through .ci/run)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

# Installs Debian package PKG when command BIN is missing.
need_pkg() {
    local bin="$1" pkg="$2"
    if ! command -v "$bin" >/dev/null 2>&1; then
        step "installing $pkg (for $bin)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg"
    fi
}

if ! command -v cargo >/dev/null 2>&1; then
    echo "tests/run.sh: cargo not found. Install Rust (https://rustup.rs), e.g.:" >&2
    echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . \"\$HOME/.cargo/env\"" >&2
    exit 1
fi

# Installs rustup component COMPONENT when `cargo SUBCOMMAND --version` fails.
need_component() {
    local subcommand="$1" component="$2"
    if ! cargo "$subcommand" --version >/dev/null 2>&1; then
        if ! command -v rustup >/dev/null 2>&1; then
            echo "tests/run.sh: 'cargo $subcommand' is missing and there is no rustup to add $component" >&2
            exit 1
        fi
        step "installing the $component component"
        rustup component add "$component"
    fi
}
need_component fmt rustfmt
need_component clippy clippy

# Packages the build and tests need. cargo links through `cc`, which rustup does not install.
need_pkg cc build-essential
# The Redis limiter tests (tests/redis*.rs) start their own redis-server: plain, with
# --tls-port (Debian's is built with TLS), as sentinels (`redis-server --sentinel`, the binary
# the redis-sentinel package links to) and as a cluster; redis-cli (redis-tools, a dependency
# of redis-server) creates the cluster.
need_pkg redis-server redis-server
need_pkg redis-cli redis-tools
# The signal tests (tests/cli.rs, tests/redis.rs) send signals with kill(1), which slim images
# lack.
need_pkg kill procps
# tests/auth.rs runs a WSGI upstream (Python's wsgiref); the soak's load generator is Python too.
need_pkg python3 python3

# The slow-loris test holds about 2,000 sockets (client and server ends in one process);
# Debian's default soft limit is 1,024 descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

if cargo nextest --version >/dev/null 2>&1; then
    # Tests that measure latency or resource use run on their own after the rest, so the
    # other tests' load on the two cores does not decide their figures.
    quiet='binary(hardening) | binary(proxy_leaks) | binary(redis) | binary(redis_sentinel) | binary(redis_cluster) | binary(key_store_redis)'
    step "cargo nextest run --all-targets (all but the timing-sensitive tests)"
    cargo nextest run --all-targets -E "not ($quiet)"
    step "cargo nextest run (timing-sensitive tests, alone, one at a time)"
    cargo nextest run --all-targets --test-threads 1 -E "$quiet"
else
    step "cargo test --all-targets"
    cargo test --all-targets
fi

# A 20 s soak of the release binary: mixed load, upstream faults, reloads; checks no crash,
# steady RSS, fds back to baseline, every request answered (benches/soak.sh, README "Soak").
step "soak (20 s): benches/soak.sh 20"
bash benches/soak.sh 20

step "cargo test --doc"
cargo test --doc

step "all checks passed"
