#!/usr/bin/env bash
# Two writable nodes (issue 15's benchmark): the throughput of each direction under two-way
# pgbench, against a one-way relay on the same load, in one run:
#   bench/two_way.sh            SECONDS_OF_LOAD=60 CLIENTS=4
# Two fresh clusters A and B (the harness's postgresql.bench.conf, track_commit_timestamp
# on), the same tables on both: acct (20,000 accounts) and hist (a move per transaction,
# keyed from a sequence per node: odd on A, even on B). pgbench on a node moves money on its
# own half of the accounts and logs the move (an UPDATE and an INSERT per transaction).
#   one-way: pgbench on A only, a relay A -> B;
#   two-way: pgbench on A and B at once, a relay each way (source.origin = "none").
# For each direction: the source's transactions, and the rate at which the other node
# applied them (transactions / time from the load's start until the last one is there).
# Prints a table; JSON lines to $RESULTS_FILE. Needs bench/install.sh (release build).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$repo/../shared/bench}
bin=${WALRELAY_BIN:-$repo/target/release/walrelay}
secs=${SECONDS_OF_LOAD:-60}
clients=${CLIENTS:-4}
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
results=${RESULTS_FILE:-$harness/results/$stamp-two-way.json}
set +euo pipefail   # lib.sh is written for plain bash
. "$harness/lib.sh"
work=$WORK_DIR/walrelay-two-way
rm -rf "$work"; mkdir -p "$work" "$LOG_DIR"
A_DIR=$BENCH_ROOT/two-way-a; B_DIR=$BENCH_ROOT/two-way-b
A_PORT=$SRC_PORT; B_PORT=$DST_PORT
trap 'kill $(jobs -p) 2>/dev/null; bench_stop "$A_DIR"; bench_stop "$B_DIR"' EXIT

# fresh_pair: both clusters new, with the tables and their node's sequence.
fresh_pair() {
  local dir port node start
  for node in a b; do
    if [ $node = a ]; then dir=$A_DIR port=$A_PORT start=1; else dir=$B_DIR port=$B_PORT start=2; fi
    bench_initdb "$dir" "$port" "track_commit_timestamp = on"
    bench_start "$dir"
    q "$port" "CREATE DATABASE $BENCH_DB" postgres
    q "$port" "CREATE TABLE acct (id int PRIMARY KEY, balance bigint NOT NULL DEFAULT 0);
      CREATE TABLE hist (id bigint PRIMARY KEY, node text NOT NULL, acct int NOT NULL, delta int NOT NULL);
      INSERT INTO acct (id) SELECT generate_series(1, 20000);
      CREATE SEQUENCE hist_id INCREMENT 2 START $start" >/dev/null || die "tables on $node"
    q "$port" "VACUUM ANALYZE acct" >/dev/null
  done
}

# script NODE LOW HIGH: pgbench's transaction on NODE's accounts.
script() {
  cat >"$work/$1.sql" <<SQL
\set aid random($2, $3)
\set delta random(-5000, 5000)
BEGIN;
UPDATE acct SET balance = balance + :delta WHERE id = :aid;
INSERT INTO hist (id, node, acct, delta) VALUES (nextval('hist_id'), '$1', :aid, :delta);
END;
SQL
}
script A 1 10000
script B 10001 20000

# relay NAME FROM_PORT TO_PORT: start `walrelay run` from one node to the other; its pid
# in RELAY_PID (not printed: a command substitution would make it a subshell's child).
relay() {
  cat >"$work/$1.toml" <<TOML
[source]
url = "$(conninfo "$2")"
tables = ["public.acct", "public.hist"]
origin = "none"
spill_dir = "$work/spill-$1"

[snapshot]
enabled = false

[[sink]]
type = "postgres"
url = "$(conninfo "$3")"
TOML
  "$bin" run --config "$work/$1.toml" >"$work/$1-$phase.log" 2>&1 &
  RELAY_PID=$!
}

# wait_streaming PORT PID: until the node's slot is read past startup by relay PID.
wait_streaming() {
  until [ "$(q "$1" "SELECT coalesce(bool_or(r.state <> 'startup'), false) FROM pg_replication_slots s
                     JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = 'walrelay'")" = t ]; do
    kill -0 "$2" 2>/dev/null || die "the relay exited; see $work"
    sleep 0.1
  done
}

# applied NODE FROM_PORT TO_PORT T0: wait until TO has every move NODE made on FROM; print
# "transactions seconds".
applied() {
  local n; n=$(q "$2" "SELECT count(*) FROM hist WHERE node = '$1'")
  until [ "$(q "$3" "SELECT count(*) FROM hist WHERE node = '$1'")" -ge "$n" ]; do sleep 0.05; done
  echo "$n $(elapsed "$4")"
}

run_phase() {
  phase=$1
  fresh_pair
  local pids=() t0 loads=()
  relay a_to_b "$A_PORT" "$B_PORT"; pids+=("$RELAY_PID")
  wait_streaming "$A_PORT" "$RELAY_PID"
  if [ "$phase" = two-way ]; then
    relay b_to_a "$B_PORT" "$A_PORT"; pids+=("$RELAY_PID")
    wait_streaming "$B_PORT" "$RELAY_PID"
  fi
  t0=$(now)
  pgbench -n -c "$clients" -j 2 -T "$secs" -f "$work/A.sql" -p "$A_PORT" "$BENCH_DB" >"$work/pgbench-A-$phase.log" 2>&1 &
  loads+=($!)
  if [ "$phase" = two-way ]; then
    pgbench -n -c "$clients" -j 2 -T "$secs" -f "$work/B.sql" -p "$B_PORT" "$BENCH_DB" >"$work/pgbench-B-$phase.log" 2>&1 &
    loads+=($!)
  fi
  wait "${loads[@]}"
  local ab ba=""
  ab=$(applied A "$A_PORT" "$B_PORT" "$t0")
  [ "$phase" = two-way ] && ba=$(applied B "$B_PORT" "$A_PORT" "$t0")
  for p in "${pids[@]}"; do kill -TERM "$p"; wait "$p"; done
  local a_tps b_tps
  a_tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/pgbench-A-$phase.log" | head -1)
  b_tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/pgbench-B-$phase.log" 2>/dev/null | head -1)
  report "$phase" "A -> B" "$a_tps" $ab
  [ "$phase" = two-way ] && report "$phase" "B -> A" "$b_tps" $ba
  bench_stop "$A_DIR"; bench_stop "$B_DIR"
}

# report PHASE DIRECTION SOURCE_TPS TRANSACTIONS SECONDS
report() {
  local rate; rate=$(awk -v n="$4" -v s="$5" 'BEGIN{printf "%.0f", n/s}')
  log "$1 $2: source $3 tps; $4 transactions applied in ${5}s = $rate/s"
  printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" "$5" "$rate" >>"$work/table.md"
  printf '{"stamp":"%s","bench":"two-way","phase":"%s","direction":"%s","source_tps":%s,"transactions":%s,"seconds":%s,"applied_per_s":%s,"seconds_of_load":%s,"clients":%s}\n' \
    "$stamp" "$1" "$2" "$3" "$4" "$5" "$rate" "$secs" "$clients" >>"$results"
}

: >"$work/table.md"
run_phase one-way
run_phase two-way
echo "| phase | direction | source tps | transactions | seconds to applied | applied per s |"
echo "|---|---|---|---|---|---|"
cat "$work/table.md"
log "results in $results; logs in $work"
