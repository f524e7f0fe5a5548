#!/usr/bin/env bash
# The write pause of `walrelay cutover` and `rollback` under pgbench, on W1's database:
#   bench/cutover.sh [RUNS]
# Each run: fresh source from the template, an empty target; `walrelay migrate` copies,
# catches up and verifies; then pgbench (4 clients) writes to the source and a probe
# writes one row at a time to whichever server takes it (source first). `walrelay cutover`
# runs 10 s into pgbench, `walrelay rollback` 10 s later. Two pauses per switch:
#   - walrelay's own: from the fence (writes stopped) to the new side writable;
#   - the probe's: from its first refused write on the old side to its first accepted
#     write on the new side (psql per attempt: about 10 ms resolution).
# Prints one JSON line per run. Run bench/install.sh and make-template.sh first.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$repo/../shared/bench}
runs=${1:-3}
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
export RESULTS_FILE=${RESULTS_FILE:-$harness/results/$stamp-cutover.json}
for ((r = 1; r <= runs; r++)); do
  (
    set +euo pipefail
    . "$harness/lib.sh"
    load_system walrelay
    export SYSTEM=walrelay-migrate
    dir="$WORK_DIR/$SYSTEM"
    cleanup() {
      [ -f "$dir/migrate.pid" ] && kill -TERM "$(cat "$dir/migrate.pid")" 2>/dev/null
      sleep 2
      for port in "$SRC_PORT" "$DST_PORT"; do
        q "$port" "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active" >/dev/null 2>&1 || true
      done
      bench_stop "$DST_DIR"; bench_stop "$SRC_DIR"
    }
    trap cleanup EXIT
    bench_stop "$DST_DIR"; bench_stop "$SRC_DIR"
    rm -rf "${dir:?}"; mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown "$BENCH_OS_USER" "$dir"
    bench_fresh_source "$(sys_src_conf)"
    bench_fresh_target "wal_level = logical"
    tables=""; for t in $BENCH_TABLES; do tables+="\"public.$t\", "; done
    cat >"$dir/move.toml" <<CONF
[source]
url = "host=127.0.0.1 port=$SRC_PORT dbname=$BENCH_DB user=$PGUSER sslmode=disable"
slot = "walrelay_move"
publication = "walrelay_move"
tables = [${tables%, }]
spill_dir = "$dir/spill"

[snapshot]
parallel = 4

[[sink]]
type = "postgres"
url = "host=127.0.0.1 port=$DST_PORT dbname=$BENCH_DB user=$PGUSER sslmode=disable"
CONF
    setsid "$WALRELAY_BIN" migrate --config "$dir/move.toml" >"$LOG_DIR/migrate.log" 2>&1 </dev/null &
    echo $! >"$dir/migrate.pid"
    t0=$(now)
    until [ "$(q "$DST_PORT" "SELECT phase FROM walrelay.migration" 2>/dev/null)" = ready ]; do
      kill -0 "$(cat "$dir/migrate.pid")" 2>/dev/null || die "migrate exited: $(tail -5 "$LOG_DIR/migrate.log")"
      sleep 0.5
    done
    t_ready=$(elapsed "$t0")
    log "migrate ready after $t_ready s"

    # The probe: one row at a time, to the source until refused, then to whichever takes it.
    probe() {
      local side=0 ports=("$SRC_PORT" "$DST_PORT")
      while [ ! -f "$dir/probe.stop" ]; do
        if psql -X -q -At -p "${ports[$side]}" -d "$BENCH_DB" \
             -c "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now())" >/dev/null 2>&1; then
          echo "$(now) $side ok"
        else
          echo "$(now) $side refused"; side=$((1 - side))
        fi
      done >"$dir/probe.log"
    }
    probe &
    probe_pid=$!
    pgbench -n -c 4 -j 2 -T 40 -P 5 -p "$SRC_PORT" "$BENCH_DB" >"$LOG_DIR/cutover-pgbench.log" 2>&1 &
    pgbench_pid=$!
    sleep 10
    cut=$("$WALRELAY_BIN" cutover --config "$dir/move.toml" 2>&1 | tail -1)
    sleep 10
    back=$("$WALRELAY_BIN" rollback --config "$dir/move.toml" 2>&1 | tail -1)
    sleep 3
    touch "$dir/probe.stop"; wait "$probe_pid"
    wait "$pgbench_pid"   # ended by the fence: its clients' sessions are terminated
    # The probe's pauses: first refused write on side A, then first accepted on side B.
    pauses=$(awk '
      $3 == "refused" && !(($2) in first_refused) && seen_ok[$2] { first_refused[$2] = $1 }
      $3 == "ok" { seen_ok[$2] = 1 }
      $3 == "ok" && $2 == 1 && (0 in first_refused) && !got1 { p1 = $1 - first_refused[0]; got1 = 1 }
      $3 == "ok" && $2 == 0 && got1 && (1 in first_refused) && !got0 { p0 = $1 - first_refused[1]; got0 = 1 }
      END { printf "%.3f %.3f", p1, p0 }' "$dir/probe.log")
    read -r probe_cut probe_back <<<"$pauses"
    walrelay_cut=$(sed -n 's/.*write pause \([0-9.]*\) s.*/\1/p' <<<"$cut")
    walrelay_back=$(sed -n 's/.*write pause \([0-9.]*\) s.*/\1/p' <<<"$back")
    tps=$(sed -n 's/^progress: 5.0 s, \([0-9.]*\) tps.*/\1/p' "$LOG_DIR/cutover-pgbench.log" | head -1)
    line=$(jq -c -n --argjson ready "$t_ready" --arg cut "$cut" --arg back "$back" \
      --argjson wc "${walrelay_cut:-null}" --argjson wb "${walrelay_back:-null}" \
      --argjson pc "${probe_cut:-null}" --argjson pb "${probe_back:-null}" --argjson tps "${tps:-null}" \
      '{workload:"cutover under pgbench", migrate_ready_s:$ready, pgbench_tps_before:$tps,
        cutover:{walrelay_pause_s:$wc, probe_pause_s:$pc, said:$cut},
        rollback:{walrelay_pause_s:$wb, probe_pause_s:$pb, said:$back}}')
    echo "$line"; echo "$line" >>"$RESULTS_FILE"
  )
done
echo "results: $RESULTS_FILE" >&2
