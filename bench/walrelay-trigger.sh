# systems/walrelay-trigger.sh -- walrelay with trigger capture and a postgres sink, for
# ../shared/bench. Install: bench/install.sh (copies this file and walrelay.sh, whose
# launch and stop it uses, into the harness's systems/).
#
# The source runs at wal_level = replica (as a source that cannot do logical decoding
# would; the baseline runs get the same setting, so the overhead is the triggers' alone).
# walrelay installs its capture schema and triggers at start, copies the tables in a
# snapshot it ticks at, then ships the log in batches. The copy is done when every table is
# marked `done` in the target's walrelay.copies.
. "$BENCH_DIR/systems/walrelay.sh"
WRT_CONSUMER=walrelay_bench

sys_version() { echo "$("$WALRELAY_BIN" --version) capture=trigger"; }

sys_src_conf() { echo "wal_level = replica"; }

wr_config() {
  local tables="" t
  for t in $BENCH_TABLES; do tables+="\"public.$t\", "; done
  cat >"$(wr_dir)/walrelay.toml" <<CONF
[source]
url = "host=127.0.0.1 port=$SRC_PORT dbname=$BENCH_DB user=$PGUSER sslmode=disable"
capture = "trigger"
slot = "$WRT_CONSUMER"
tables = [${tables%, }]

[snapshot]
parallel = ${WALRELAY_PARALLEL:-4}

# DDL capture needs logical decoding's messages; trigger capture refuses it.
[ddl]
mode = "off"

[[sink]]
type = "postgres"
url = "host=127.0.0.1 port=$DST_PORT dbname=$BENCH_DB user=$PGUSER sslmode=disable"
CONF
}

# Streaming: the copy of every table is done (walrelay then ships the log at once).
wr_wait_streaming() {
  local i n=0 t
  for t in $BENCH_TABLES; do n=$((n + 1)); done
  for ((i = 0; i < 36000; i++)); do
    [ "$(q "$DST_PORT" "SELECT count(*) FROM walrelay.copies WHERE state = 'done'" 2>/dev/null)" = "$n" ] && return 0
    kill -0 "$(wr_pid)" 2>/dev/null || { log "walrelay exited; see $LOG_DIR/walrelay-run.log"; return 1; }
    sleep 0.1
  done
  return 1
}

# No slot: the WAL written since the batch the relay last confirmed.
sys_lag_bytes() {
  local v
  v=$(q "$SRC_PORT" "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), t.lsn)::bigint
        FROM walrelay_capture.consumers c JOIN walrelay_capture.ticks t ON t.id = c.tick
        WHERE c.name = '$WRT_CONSUMER'" 2>/dev/null)
  echo "${v:-null}"
}

sys_teardown() {
  wr_stop
  "$WALRELAY_BIN" uninstall --config "$(wr_dir)/walrelay.toml" >>"$LOG_DIR/walrelay-run.log" 2>&1 || true
}
