#!/usr/bin/env bash
# The amqp sink against the slot's raw decode rate, in one run (issue 6's benchmark):
#   bench/amqp.sh            W2_SECONDS=60 BIG_ROWS=1000000 BATCHES="transaction row"
# Two backlogs are made on a fresh source from the harness's template, with two slots
# already in place: W2 (pgbench -c 4 -j 2 for W2_SECONDS) and one transaction updating
# BIG_ROWS rows. For each backlog:
#   decode: pg_logical_slot_get_binary_changes on slot `decode` (pgoutput, proto 1) up to
#           the backlog's end, timed in the server: the slot's raw decode rate;
#   walrelay: `walrelay run` with an amqp sink, timed from start until slot `walrelay` has
#           confirmed the backlog's end (every message confirmed by the broker).
# Each walrelay measurement gets its own copy of the slot (pg_copy_logical_replication_slot).
# Prints changes per second and the ratio walrelay / decode; JSON lines to $RESULTS_FILE.
# Needs: bench/install.sh (release build), the harness template (make-template.sh), and the
# RabbitMQ at 127.0.0.1:5672 (guest/guest).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$repo/../shared/bench}
bin=${WALRELAY_BIN:-$repo/target/release/walrelay}
secs=${W2_SECONDS:-60}
big_rows=${BIG_ROWS:-1000000}
batches=${BATCHES:-transaction row}
broker=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
results=${RESULTS_FILE:-$harness/results/$stamp-amqp.json}
set +euo pipefail   # lib.sh is written for plain bash
. "$harness/lib.sh"
work=$WORK_DIR/walrelay-amqp
rm -rf "$work"; mkdir -p "$work"
trap 'bench_stop "$SRC_DIR"' EXIT
bench_stop "$DST_DIR"
bench_fresh_source "" || exit 1
tables="pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history"
q "$SRC_PORT" "CREATE PUBLICATION walrelay FOR TABLE $tables WITH (publish_via_partition_root = true)" >/dev/null
q "$SRC_PORT" "SELECT pg_create_logical_replication_slot('decode', 'pgoutput')" >/dev/null
q "$SRC_PORT" "SELECT pg_create_logical_replication_slot('base', 'pgoutput')" >/dev/null

# measure NAME: decode and walrelay over the backlog from the slots' position to now.
measure() {
  local name=$1 end changes t0 decode_s
  end=$(q "$SRC_PORT" "SELECT pg_current_wal_insert_lsn()")
  # Slots for walrelay first, copied from `base` before `decode` moves on.
  for b in $batches; do
    q "$SRC_PORT" "SELECT pg_copy_logical_replication_slot('base', 'walrelay_$b')" >/dev/null
  done
  t0=$(now)
  changes=$(q "$SRC_PORT" "SELECT count(*) FILTER (WHERE get_byte(data, 0) IN (73, 85, 68))
      FROM pg_logical_slot_get_binary_changes('decode', '$end', NULL,
           'proto_version', '1', 'publication_names', 'walrelay')")
  decode_s=$(elapsed "$t0")
  local decode_rate; decode_rate=$(awk -v c="$changes" -v s="$decode_s" 'BEGIN{printf "%.0f", c/s}')
  log "$name: $changes changes; raw decode ${decode_s}s = $decode_rate changes/s"
  for b in $batches; do
    local queue=walrelay-bench-$b cfg=$work/$name-$b.toml
    cat >"$cfg" <<TOML
[source]
url = "host=127.0.0.1 port=$SRC_PORT dbname=$BENCH_DB user=postgres"
slot = "walrelay_$b"
tables = ["public.pgbench_accounts", "public.pgbench_branches", "public.pgbench_tellers", "public.pgbench_history"]
spill_dir = "$work/spill-$b"

[snapshot]
enabled = false

[[sink]]
type = "amqp"
url = "$broker"
exchange = "walrelay-bench"
batch = "$b"
queues = [{ name = "$queue" }]
TOML
    rabbitmqctl -q purge_queue "$queue" >/dev/null 2>&1
    t0=$(now)
    "$bin" run --config "$cfg" >"$work/$name-$b.log" 2>&1 &
    local pid=$!
    until [ "$(q "$SRC_PORT" "SELECT confirmed_flush_lsn >= '$end' FROM pg_replication_slots WHERE slot_name = 'walrelay_$b'")" = t ]; do
      kill -0 "$pid" 2>/dev/null || { log "walrelay exited: $(tail -3 "$work/$name-$b.log")"; return 1; }
      sleep 0.05
    done
    local run_s; run_s=$(elapsed "$t0")
    kill -TERM "$pid"; wait "$pid"
    local messages; messages=$(rabbitmqctl -q list_queues name messages | awk -v q="$queue" '$1 == q {print $2}')
    rabbitmqctl -q delete_queue "$queue" >/dev/null 2>&1
    q "$SRC_PORT" "SELECT pg_drop_replication_slot('walrelay_$b')" >/dev/null
    local rate ratio
    rate=$(awk -v c="$changes" -v s="$run_s" 'BEGIN{printf "%.0f", c/s}')
    ratio=$(awk -v a="$rate" -v b="$decode_rate" 'BEGIN{printf "%.2f", a/b}')
    log "$name batch=$b: ${run_s}s = $rate changes/s ($messages messages); ratio to raw decode $ratio"
    jq -c -n --arg backlog "$name" --arg batch "$b" --argjson changes "$changes" \
      --argjson decode_s "$decode_s" --argjson walrelay_s "$run_s" --argjson messages "${messages:-null}" \
      --argjson decode_rate "$decode_rate" --argjson rate "$rate" --argjson ratio "$ratio" \
      '{workload:"amqp", backlog:$backlog, batch:$batch, changes:$changes, messages:$messages,
        decode_s:$decode_s, decode_changes_per_s:$decode_rate,
        walrelay_s:$walrelay_s, walrelay_changes_per_s:$rate, ratio:$ratio}' | tee -a "$results"
  done
  # Both slots past the backlog: the next one starts where this ended.
  q "$SRC_PORT" "SELECT pg_replication_slot_advance('base', '$end')" >/dev/null
}

log "W2: pgbench for ${secs}s"
bench_pgbench "$SRC_PORT" "$secs" "$work/w2.pgbench.log" >/dev/null
measure W2 || exit 1
log "one transaction of $big_rows rows"
q "$SRC_PORT" "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= $big_rows" >/dev/null
measure big_txn || exit 1
echo "results: $results" >&2
