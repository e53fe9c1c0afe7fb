#!/usr/bin/env bash
# The fencelog demo, on a fresh Debian machine as root: installs what is missing, builds, and
# runs `fencelog demo`: a private etcd on loopback, a primary and a failover standby daemon, a
# load through the API, the primary killed mid-load, the standby taking over, and every
# acknowledged record checked on the new primary. Everything started is stopped at the end.
# Extra arguments go to `fencelog demo` (try --records 1000000).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/deps.sh

cargo build --release --locked
exec "$release_bin" demo "$@"
