#!/usr/bin/env bash
# The one test command: installs what the integration tests need on a fresh Debian machine,
# then runs formatting, lint and the whole test suite. Tests start their own Mosquitto
# brokers on free ports; the system mosquitto service is not used.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] \
   || ! command -v mosquitto_pub >/dev/null 2>&1; then
  echo "test.sh: installing mosquitto and mosquitto-clients"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y mosquitto mosquitto-clients
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
echo "test.sh: cargo test --release --all-targets --no-fail-fast"
cargo test --release --all-targets --no-fail-fast
