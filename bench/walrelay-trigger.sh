# systems/walrelay-trigger.sh -- walrelay with trigger capture and a postgres sink, for
# ../shared/bench. Install: bench/install.sh (copies this file into the harness's systems/).
#
# The source runs at wal_level = replica (as a source that cannot do logical decoding
# would; the baseline runs get the same setting, so the overhead is the triggers' alone).
# walrelay installs its capture schema and triggers at start, copies the tables in a
# snapshot it ticks at, then ships the log in batches. The copy is done when every table is
# marked `done` in the target's walrelay.copies.
SYS_WORKLOADS="W1 W2 W3"
WALRELAY_BIN=${WALRELAY_BIN:-/work/main/target/release/walrelay}
WRT_CONSUMER=walrelay_bench

wrt_dir() { echo "$WORK_DIR/$SYSTEM"; }
wrt_pid() { cat "$(wrt_dir)/walrelay.pid" 2>/dev/null; }

sys_version() { echo "$("$WALRELAY_BIN" --version) capture=trigger"; }

sys_src_conf() { echo "wal_level = replica"; }

wrt_config() {
  local tables="" t
  for t in $BENCH_TABLES; do tables+="\"public.$t\", "; done
  cat >"$(wrt_dir)/walrelay.toml" <<CONF
[source]
url = "host=127.0.0.1 port=$SRC_PORT dbname=$BENCH_DB user=$PGUSER sslmode=disable"
capture = "trigger"
slot = "$WRT_CONSUMER"
tables = [${tables%, }]

[snapshot]
parallel = ${WALRELAY_PARALLEL:-4}

# DDL capture needs logical decoding's messages; trigger capture refuses it for now.
[ddl]
mode = "off"

[[sink]]
type = "postgres"
url = "host=127.0.0.1 port=$DST_PORT dbname=$BENCH_DB user=$PGUSER sslmode=disable"
CONF
}

wrt_launch() {
  setsid "$WALRELAY_BIN" run --config "$(wrt_dir)/walrelay.toml" >>"$LOG_DIR/walrelay-trigger-run.log" 2>&1 </dev/null &
  echo $! >"$(wrt_dir)/walrelay.pid"
}

# Streaming: the copy of every table is done (walrelay then ships the log at once) and the
# relay holds its consumer (its advisory lock is taken before the copy).
wrt_wait_streaming() {
  local i n=0 t
  for t in $BENCH_TABLES; do n=$((n + 1)); done
  for ((i = 0; i < 36000; i++)); do
    [ "$(q "$DST_PORT" "SELECT count(*) FROM walrelay.copies WHERE state = 'done'" 2>/dev/null)" = "$n" ] && return 0
    kill -0 "$(wrt_pid)" 2>/dev/null || { log "walrelay exited; see $LOG_DIR/walrelay-trigger-run.log"; return 1; }
    sleep 0.1
  done
  return 1
}

wrt_stop() {
  local pid i; pid=$(wrt_pid) || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 600; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

sys_setup() {
  wrt_config
  wrt_launch
}

sys_wait_copy() { wrt_wait_streaming; }

# No slot: the WAL written since the batch the relay last confirmed.
sys_lag_bytes() {
  local v
  v=$(q "$SRC_PORT" "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), t.lsn)::bigint
        FROM walrelay_capture.consumers c JOIN walrelay_capture.ticks t ON t.id = c.tick
        WHERE c.name = '$WRT_CONSUMER'" 2>/dev/null)
  echo "${v:-null}"
}

sys_pause() { wrt_stop; }
sys_resume() { wrt_launch && wrt_wait_streaming; }

# The log's size, for the bounded-log figure (bench/trigger_log.sh).
wrt_log_bytes() {
  q "$SRC_PORT" "SELECT pg_total_relation_size('walrelay_capture.log_1') + pg_total_relation_size('walrelay_capture.log_2')"
}

sys_teardown() {
  wrt_stop
  "$WALRELAY_BIN" uninstall --config "$(wrt_dir)/walrelay.toml" >>"$LOG_DIR/walrelay-trigger-run.log" 2>&1 || true
}
