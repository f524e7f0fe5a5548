#!/usr/bin/env bash
# walrelay verify against pgcopydb's data comparison, on W1's database, RUNS times:
#   bench/verify.sh [RUNS]
# Each run: fresh source from the template, walrelay copies it to a fresh target and streams
# (idle); then, with the relay running,
#   - `walrelay verify` (key ranges of 10,000 rows, checksums on both servers);
#   - the query `pgcopydb compare data` runs (src/bin/pgcopydb/schema.c, v0.18: count and
#     sha256 of the sum of hashtext(row) per table), as pgcopydb runs it: both servers at
#     once, 4 tables at a time. Debian's pgcopydb (0.10) has no `compare`, and a source
#     build needs sqlite3.c, which the mirror lacks: the query is run by psql instead.
# Prints one JSON line per run with rows, seconds and rows per second of each.
# Run bench/install.sh and (in the harness) make-template.sh first.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$repo/../shared/bench}
runs=${1:-2}
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
export RESULTS_FILE=${RESULTS_FILE:-$harness/results/$stamp-verify.json}
for ((r = 1; r <= runs; r++)); do
  (
    set +euo pipefail
    . "$harness/lib.sh"
    load_system walrelay
    export SYSTEM=walrelay
    cleanup() {
      sys_teardown >>"$LOG_DIR/verify-teardown.log" 2>&1 || true
      bench_stop "$DST_DIR"; bench_stop "$SRC_DIR"
    }
    trap cleanup EXIT
    bench_stop "$DST_DIR"; bench_stop "$SRC_DIR"
    rm -rf "${WORK_DIR:?}/$SYSTEM"; mkdir -p "$WORK_DIR/$SYSTEM"
    [ "$(id -u)" = 0 ] && chown "$BENCH_OS_USER" "$WORK_DIR/$SYSTEM"
    bench_fresh_source "$(sys_src_conf)"
    bench_fresh_target "$(sys_dst_conf)"
    sys_setup >"$LOG_DIR/verify-setup.log" 2>&1
    sys_wait_copy >>"$LOG_DIR/verify-setup.log" 2>&1 || die "the copy did not finish"
    cfg="$WORK_DIR/$SYSTEM/walrelay.toml"

    t0=$(now)
    "$WALRELAY_BIN" verify --config "$cfg" --json >"$LOG_DIR/verify.json" 2>"$LOG_DIR/verify.log"
    code=$?
    t_walrelay=$(elapsed "$t0")
    rows=$(jq '[.tables[].rows] | add' "$LOG_DIR/verify.json")

    checksum() {   # PORT TABLE
      local cols
      cols=$(q "$1" "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
                     WHERE attrelid = '$2'::regclass AND attnum > 0 AND NOT attisdropped")
      q "$1" "SELECT count(1), encode(sha256(format('%s-%s', sum(hashtext(row($cols)::text)::bigint), count(1))::bytea), 'hex') FROM ONLY $2"
    }
    compare_table() {   # TABLE -> "table ok|differs"
      local s d
      checksum "$SRC_PORT" "$1" >"$WORK_DIR/$SYSTEM/$1.src" &
      checksum "$DST_PORT" "$1" >"$WORK_DIR/$SYSTEM/$1.dst"
      wait
      s=$(cat "$WORK_DIR/$SYSTEM/$1.src"); d=$(cat "$WORK_DIR/$SYSTEM/$1.dst")
      if [ "$s" = "$d" ]; then echo "$1 ok"; else echo "$1 differs"; fi
    }
    export -f checksum compare_table q
    export SRC_PORT DST_PORT WORK_DIR SYSTEM BENCH_DB
    t0=$(now)
    baseline=$(printf '%s\n' $CHECK_TABLES_ALL | xargs -P 4 -I{} bash -c 'compare_table {}')
    t_baseline=$(elapsed "$t0")
    baseline_ok=true; grep -q differs <<<"$baseline" && baseline_ok=false

    line=$(jq -c -n --argjson rows "$rows" --argjson code "$code" \
      --argjson walrelay_s "$t_walrelay" --argjson baseline_s "$t_baseline" --argjson baseline_ok "$baseline_ok" \
      '{workload:"verify on W1", rows:$rows, walrelay:{exit:$code, seconds:$walrelay_s, rows_per_s:(($rows/$walrelay_s)|floor)},
        pgcopydb_compare_data_query:{equal:$baseline_ok, seconds:$baseline_s, rows_per_s:(($rows/$baseline_s)|floor)},
        ratio:(($walrelay_s/$baseline_s)*100|round/100)}')
    echo "$line"; echo "$line" >>"$RESULTS_FILE"
  )
done
echo "results: $RESULTS_FILE" >&2
