#!/usr/bin/env bash
# The one test command: installs what the integration tests need on a fresh Debian machine,
# then runs formatting, lint and the whole test suite. Tests start their own Mosquitto
# brokers on free ports; the system mosquitto service is not used.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# What the tests run, as Debian packages: brokers (mosquitto, mosquitto_pub/_sub, and a
# RabbitMQ cluster for the cluster tests), the stack's
# load balancer (nginx), a real browser (chromium, driven over the DevTools protocol) and
# docker-compose (validates compose.yaml; no engine needed). One update, one install, and
# only for what is missing.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
MISSING=()
have mosquitto || MISSING+=(mosquitto)
{ have mosquitto_pub && have mosquitto_sub; } || MISSING+=(mosquitto-clients)
have nginx || MISSING+=(nginx)
have chromium || MISSING+=(chromium)
have docker-compose || MISSING+=(docker-compose)
# RabbitMQ (its cluster tests): the package's server lives in /usr/lib/rabbitmq/bin.
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || MISSING+=(rabbitmq-server)
if [ ${#MISSING[@]} -gt 0 ]; then
  echo "test.sh: installing ${MISSING[*]}"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${MISSING[@]}"
fi
# Debian's package starts a system broker on port 1883; the tests never use it, and it would
# only occupy the embedded broker's default port, so stop it if it is running.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
  $SUDO systemctl stop mosquitto || true
fi

echo "test.sh: cargo fmt --check"
cargo fmt --check
echo "test.sh: cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
# The fuzz targets are their own workspace: formatted and linted too, without linking
# libFuzzer (its C++ build and nightly flags are only needed to run them).
echo "test.sh: fuzz targets: cargo fmt --check, cargo clippy"
cargo fmt --check --manifest-path fuzz/Cargo.toml
cargo clippy --manifest-path fuzz/Cargo.toml --no-default-features --all-targets -- -D warnings
# The benchmark tool is its own workspace too (bench/): formatted and linted the same way.
echo "test.sh: bench crate: cargo fmt --check, cargo clippy"
cargo fmt --check --manifest-path bench/Cargo.toml
cargo clippy --manifest-path bench/Cargo.toml --all-targets -- -D warnings
# Two test binaries: tests/it (fast, in parallel, with the unit tests) and tests/e2e (broker
# faults, floods, shutdown, nginx, the browser, RabbitMQ: they measure time and memory, so one
# at a time). Everything below runs even when something fails; the script fails at the end.
echo "test.sh: cargo test --release --no-fail-fast --lib --bins --test it"
tests_ok=true
# Each run is also kept in target/test-logs, so that the failures can be shown again at the very
# end, where a CI log that keeps only its last part still shows them.
mkdir -p target/test-logs
cargo test --release --no-fail-fast --lib --bins --test it 2>&1 | tee target/test-logs/it.log || tests_ok=false
echo "test.sh: cargo test --release --no-fail-fast --test e2e -- --test-threads=1"
cargo test --release --no-fail-fast --test e2e -- --test-threads=1 2>&1 | tee target/test-logs/e2e.log || tests_ok=false
# The benchmark tool keeps working: a tiny run of every scenario (well under 20 s) against its
# own Mosquitto and the fanout binary built here (target/release/fanout); it exits non-zero when
# a scenario fails or loses messages.
echo "test.sh: fanout-bench --smoke"
cargo build --release --bin fanout
cargo build --release --manifest-path bench/Cargo.toml
bench/target/release/fanout-bench --smoke --fanout target/release/fanout --out target/bench-smoke || tests_ok=false

# ---- JavaScript client (clients/js) ------------------------------------------------------
# Node is on every machine (>= 20). `npm ci` installs the dev dependencies (ws, typescript)
# from the committed lockfile; the client itself has none. Unit tests use a fake socket; the
# integration tests drive target/release/fanout (built above) with Mosquitto and nginx via
# scripts/stack.sh on free ports.
echo "test.sh: clients/js: npm ci, typecheck, unit and integration tests"
# (&& chains: `set -e` does not apply inside a command whose status `||` tests.)
(
  cd clients/js &&
    npm ci --no-audit --no-fund &&
    npm run --silent typecheck &&
    FANOUT_BIN="$PWD/../../target/release/fanout" npm test &&
    FANOUT_BIN="$PWD/../../target/release/fanout" npm run --silent test:integration
) || tests_ok=false
if ! $tests_ok; then
  # The Rust tests' failure reports again (the last 250 lines of each), then the verdict.
  for log in target/test-logs/it.log target/test-logs/e2e.log; do
    grep -q '^failures:$' "$log" 2>/dev/null || continue
    echo "test.sh: failures in $log (again):" >&2
    sed -n '/^failures:$/,/^test result/p' "$log" | tail -n 250 >&2
  done
  echo "test.sh: some tests failed (see above)" >&2
  exit 1
fi
echo "test.sh: everything passed"
