#!/usr/bin/env bash
# W3 on one source with and without trigger capture (issue 12: "the source UPDATE with
# capture on takes at most 1.5× its time without"). The harness's W3 compares against
# another system's fresh cluster; this runs the same UPDATE on the same server, the
# capture's triggers disabled and enabled in turn, each time on a compacted table (VACUUM
# FULL) after a CHECKPOINT, with the harness's postgresql.conf. Run by hand:
#   bench/trigger_w3.sh            RUNS=3 SCALE=50
# Prints each run and the ratios; JSON lines to $RESULTS_FILE. Needs bench/install.sh.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$repo/../shared/bench}
bin=${WALRELAY_BIN:-$repo/target/release/walrelay}
runs=${RUNS:-3}
scale=${SCALE:-50}
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
results=${RESULTS_FILE:-$harness/results/$stamp-trigger-w3.json}
set +euo pipefail   # lib.sh is written for plain bash
. "$harness/lib.sh"
work=$WORK_DIR/walrelay-trigger-w3
rm -rf "$work"; mkdir -p "$work" "$LOG_DIR"
S_DIR=$BENCH_ROOT/trigger-w3-src; T_DIR=$BENCH_ROOT/trigger-w3-dst
trap 'kill $(jobs -p) 2>/dev/null; bench_stop "$S_DIR"; bench_stop "$T_DIR"' EXIT

bench_initdb "$S_DIR" "$SRC_PORT" "wal_level = replica"
bench_initdb "$T_DIR" "$DST_PORT"
bench_start "$S_DIR"; bench_start "$T_DIR"
q "$SRC_PORT" "CREATE DATABASE $BENCH_DB" postgres
q "$DST_PORT" "CREATE DATABASE $BENCH_DB" postgres
pgbench -i -q -s "$scale" -p "$SRC_PORT" "$BENCH_DB" >"$work/pgbench-init.log" 2>&1 || die "pgbench -i"

# The relay installs the triggers and copies the tables once; the runs need no relay.
cat >"$work/walrelay.toml" <<TOML
[source]
url = "$(conninfo "$SRC_PORT")"
capture = "trigger"
tables = ["public.pgbench_accounts", "public.pgbench_branches", "public.pgbench_tellers", "public.pgbench_history"]

[ddl]
mode = "off"

[[sink]]
type = "postgres"
url = "$(conninfo "$DST_PORT")"
TOML
"$bin" run --config "$work/walrelay.toml" >"$work/relay.log" 2>&1 &
relay=$!
until [ "$(q "$DST_PORT" "SELECT count(*) FROM walrelay.copies WHERE state = 'done'" 2>/dev/null)" = 4 ]; do
  kill -0 "$relay" 2>/dev/null || die "the relay exited; see $work/relay.log"
  sleep 0.2
done
kill -TERM "$relay"; wait "$relay"

# one_run on|off: the UPDATE's seconds.
one_run() {
  local how=disable
  [ "$1" = on ] && how=enable
  q "$SRC_PORT" "ALTER TABLE pgbench_accounts $how TRIGGER USER" >/dev/null
  q "$SRC_PORT" "TRUNCATE walrelay_capture.log_1, walrelay_capture.log_2" >/dev/null
  q "$SRC_PORT" "VACUUM FULL pgbench_accounts" >/dev/null
  q "$SRC_PORT" "CHECKPOINT" >/dev/null
  local t0; t0=$(now)
  q "$SRC_PORT" "UPDATE pgbench_accounts SET abalance = abalance + 1" >/dev/null || die "W3 update failed"
  elapsed "$t0"
}

rows=$(q "$SRC_PORT" "SELECT count(*) FROM pgbench_accounts")
ratios=()
for ((r = 1; r <= runs; r++)); do
  off=$(one_run off)
  on=$(one_run on)
  logged=$(q "$SRC_PORT" "SELECT (SELECT count(*) FROM walrelay_capture.log_1) + (SELECT count(*) FROM walrelay_capture.log_2)")
  [ "$logged" = "$rows" ] || die "run $r: $logged rows logged for $rows updated"
  ratio=$(echo "scale=2; $on / $off" | bc)
  ratios+=("$ratio")
  printf 'run %d: %s rows, without capture %.1f s, with capture %.1f s: %s×\n' "$r" "$rows" "$off" "$on" "$ratio"
  echo "{\"kind\":\"w3\",\"run\":$r,\"rows\":$rows,\"without_s\":$off,\"with_s\":$on,\"ratio\":$ratio}" >>"$results"
done
echo "ratios: ${ratios[*]} (target: at most 1.5)"
echo "results: $results"
