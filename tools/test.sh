#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine as root: installs what is missing, checks
# formatting and lints, then runs every test. Integration tests start their own etcd on
# loopback and kill it when they finish; benches run once each as a smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/deps.sh

# FENCELOG_LONG=1: the long mode, with the rounds and sizes quoted in docs/RELIABILITY.md and
# docs/BENCHMARKS.md (fault rounds, a 5M-record retention run, a long decoder fuzz).
if [ "${FENCELOG_LONG:-0}" = 1 ]; then
  export FENCELOG_FAULT_ROUNDS=${FENCELOG_FAULT_ROUNDS:-10}
  export FENCELOG_LONG_RECORDS=${FENCELOG_LONG_RECORDS:-5000000}
  export FENCELOG_FUZZ_CASES=${FENCELOG_FUZZ_CASES:-300000}
fi

cargo fmt --all -- --check
cargo clippy --all-targets --features failpoints --locked -- -D warnings
# The library's documentation builds without a warning (a broken or private link fails it).
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked
cargo test --benches --locked
cargo test --lib --bins --tests --features failpoints --locked
# The example state machine, embedded in a primary on an etcd of its own.
cargo run --example counters --locked
