#!/usr/bin/env bash
# Measures, in one run on this machine: a snapshot of a ~1M-key state transferred and installed
# (`fencelog bootstrap`, keys/s and MB/s), and how long a new standby takes to join a cluster
# with that history by snapshot versus by replaying the whole log from etcd.
# Usage: tools/bench_snapshot.sh [RECORDS [KEYSPACE]]   (default 1000000 records, a key each;
# with KEYSPACE, records overwrite KEYSPACE keys: a long history over a smaller state)
set -euo pipefail
cd "$(dirname "$0")/.."
extra_tools=(python3 bc)
source tools/deps.sh
records=${1:-1000000}
keyspace=${2:-$records}
cargo build --release --locked -q
bin=$release_bin
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_client=$(port); etcd_peer=$(port)
etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_client" \
  --advertise-client-urls "http://127.0.0.1:$etcd_client" --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" --initial-cluster "default=http://127.0.0.1:$etcd_peer" \
  --snapshot-count 5000 >"$work/etcd.log" 2>&1 &
pids+=($!)
endpoint="http://127.0.0.1:$etcd_client"
sleep 2
daemon() { # VAR role name extra...: starts a daemon, sets VAR to its API address
  local var=$1 role=$2 name=$3; shift 3
  local api=127.0.0.1:$(port)
  "$bin" "$role" --cluster bench --node "$name" --data-dir "$work/$name" --etcd "$endpoint" \
    --listen "$api" --metrics "127.0.0.1:$(port)" "$@" >/dev/null 2>"$work/$name.log" &
  pids+=($!)
  printf -v "$var" '%s' "$api"
}
field() { "$bin" status --server "$1" --json 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['$2'])" 2>/dev/null || echo -1; }
wait_applied() { # api seq
  while [ "$(field "$1" applied_seq)" -lt "$2" ]; do sleep 0.05; done
}
daemon primary primary a --retain-records 100000000 --max-etcd-log-bytes 4000000000
until [ "$(field "$primary" role)" = primary ]; do sleep 0.1; done
echo "== loading $records records over $keyspace keys"
"$bin" load --server "$primary" --records "$records" --keyspace "$keyspace" --concurrency 32 --batch 256 | sed 's/^/   /'
wait_applied "$primary" "$records"

echo "== snapshot: transfer and install (fencelog bootstrap)"
start=$(date +%s.%N)
"$bin" bootstrap --server "$primary" --data-dir "$work/b" | sed 's/^/   /'
daemon snap_api standby b
wait_applied "$snap_api" "$records"
until [ "$(field "$snap_api" state)" = watching ]; do sleep 0.05; done
join_snapshot=$(echo "$(date +%s.%N) - $start" | bc)

echo "== replay: a new standby reading the whole log from etcd"
start=$(date +%s.%N)
daemon replay_api standby c
wait_applied "$replay_api" "$records"
join_replay=$(echo "$(date +%s.%N) - $start" | bc)
printf '   join by snapshot (bootstrap + start + catch-up): %.2f s\n' "$join_snapshot"
printf '   join by replaying %s records: %.2f s (%.1fx the snapshot)\n' "$records" "$join_replay" \
  "$(echo "$join_replay / $join_snapshot" | bc -l)"
