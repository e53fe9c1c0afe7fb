#!/usr/bin/env bash
# The benchmark suite in one sitting (release build): `fencelog bench` starts its own etcd for
# each measurement and writes docs/bench/REPORT.md and docs/bench/throughput.png.
# Usage: tools/bench.sh [SECONDS_PER_MEASUREMENT]   (default 5; more arguments go to fencelog bench)
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/deps.sh
seconds=${1:-5}
shift || true
cargo build --release --locked -q
"$release_bin" bench --seconds "$seconds" \
  --report docs/bench/REPORT.md --plot docs/bench/throughput.png "$@"
