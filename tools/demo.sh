#!/usr/bin/env bash
# The fencelog demo, on a fresh Debian machine as root: installs what is missing, builds, and
# runs `fencelog demo`, which starts a private etcd on loopback and a primary, appends records
# from concurrent producers, rebuilds a second store from etcd and checks that both agree.
# Extra arguments go to `fencelog demo` (try --records 1000000).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/deps.sh

cargo build --release --locked
exec target/release/fencelog demo "$@"
