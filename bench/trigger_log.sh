#!/usr/bin/env bash
# Trigger capture's log stays bounded (issue 12): pgbench for MINUTES on a source at
# wal_level = replica, a relay with capture = "trigger" to a postgres target, the log's size
# sampled every SAMPLE seconds. Run by hand (a figure, not a test):
#   bench/trigger_log.sh            MINUTES=10 SAMPLE=10 CLIENTS=4 SCALE=5 ROTATION=10s
# Prints the samples (seconds, log rows, log bytes, rows logged so far, relay lag) and a
# summary; JSON lines to $RESULTS_FILE. Needs bench/install.sh (release build).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$repo/../shared/bench}
bin=${WALRELAY_BIN:-$repo/target/release/walrelay}
minutes=${MINUTES:-10}
sample=${SAMPLE:-10}
clients=${CLIENTS:-4}
scale=${SCALE:-5}
rotation=${ROTATION:-10s}
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
results=${RESULTS_FILE:-$harness/results/$stamp-trigger-log.json}
set +euo pipefail   # lib.sh is written for plain bash
. "$harness/lib.sh"
work=$WORK_DIR/walrelay-trigger-log
rm -rf "$work"; mkdir -p "$work" "$LOG_DIR"
S_DIR=$BENCH_ROOT/trigger-log-src; T_DIR=$BENCH_ROOT/trigger-log-dst
trap 'kill $(jobs -p) 2>/dev/null; bench_stop "$S_DIR"; bench_stop "$T_DIR"' EXIT

bench_initdb "$S_DIR" "$SRC_PORT" "wal_level = replica"
bench_initdb "$T_DIR" "$DST_PORT"
bench_start "$S_DIR"; bench_start "$T_DIR"
q "$SRC_PORT" "CREATE DATABASE $BENCH_DB" postgres
q "$DST_PORT" "CREATE DATABASE $BENCH_DB" postgres
pgbench -i -q -s "$scale" -p "$SRC_PORT" "$BENCH_DB" >"$work/pgbench-init.log" 2>&1 || die "pgbench -i"
q "$SRC_PORT" "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY" >/dev/null

cat >"$work/walrelay.toml" <<TOML
[source]
url = "$(conninfo "$SRC_PORT")"
capture = "trigger"
log_rotation = "$rotation"
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

# log_sample: "rows bytes logged lag_bytes" now.
log_sample() {
  q "$SRC_PORT" "SELECT (SELECT count(*) FROM walrelay_capture.log_1) + (SELECT count(*) FROM walrelay_capture.log_2),
       pg_total_relation_size('walrelay_capture.log_1') + pg_total_relation_size('walrelay_capture.log_2'),
       (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM walrelay_capture.log_seq),
       (SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), t.lsn)::bigint FROM walrelay_capture.consumers c
          JOIN walrelay_capture.ticks t ON t.id = c.tick)" | tr '|' ' '
}

secs=$((minutes * 60))
pgbench -n -c "$clients" -j 2 -T "$secs" -p "$SRC_PORT" "$BENCH_DB" >"$work/pgbench.log" 2>&1 &
load=$!
t0=$(now)
printf '%8s %10s %12s %12s %12s\n' seconds log_rows log_bytes logged lag_bytes
max_rows=0 max_bytes=0
while kill -0 "$load" 2>/dev/null; do
  read -r rows bytes logged lag < <(log_sample)
  printf '%8.0f %10s %12s %12s %12s\n' "$(elapsed "$t0")" "$rows" "$bytes" "$logged" "$lag"
  echo "{\"kind\":\"sample\",\"seconds\":$(elapsed "$t0"),\"log_rows\":$rows,\"log_bytes\":$bytes,\"logged\":$logged,\"lag_bytes\":${lag:-null}}" >>"$results"
  [ "$rows" -gt "$max_rows" ] && max_rows=$rows
  [ "$bytes" -gt "$max_bytes" ] && max_bytes=$bytes
  sleep "$sample"
done
wait "$load"
tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/pgbench.log" 2>/dev/null | head -1)
n=$(q "$SRC_PORT" "SELECT count(*) FROM pgbench_history")
until [ "$(q "$DST_PORT" "SELECT count(*) FROM pgbench_history")" = "$n" ]; do
  kill -0 "$relay" 2>/dev/null || die "the relay exited; see $work/relay.log"
  sleep 0.2
done
read -r rows bytes logged lag < <(log_sample)
src=$(q "$SRC_PORT" "SELECT sum(abalance) FROM pgbench_accounts")
dst=$(q "$DST_PORT" "SELECT sum(abalance) FROM pgbench_accounts")
kill -TERM "$relay"; wait "$relay"
[ "$src" = "$dst" ] || die "the target differs: sum(abalance) $src on the source, $dst on the target"
echo
echo "$minutes min of pgbench (${tps:-?} tps, $n transactions): $logged rows logged; the log held at most"
echo "$max_rows rows / $((max_bytes / 1024)) kB (both tables, with index), $rows rows / $((bytes / 1024)) kB at the end."
echo "{\"kind\":\"summary\",\"minutes\":$minutes,\"rotation\":\"$rotation\",\"tps\":${tps:-null},\"transactions\":$n,\"logged\":$logged,\"max_log_rows\":$max_rows,\"max_log_bytes\":$max_bytes,\"end_log_rows\":$rows,\"end_log_bytes\":$bytes}" >>"$results"
echo "results: $results"
