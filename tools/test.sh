#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine as root: installs what is missing, checks
# formatting and lints, then runs every test. Integration tests start their own etcd on
# loopback and kill it when they finish; benches run once each as a smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/deps.sh

cargo fmt --all -- --check
cargo clippy --all-targets --features failpoints --locked -- -D warnings
cargo test --benches --locked
cargo test --lib --bins --tests --features failpoints --locked
