# systems/walrelay.sh -- walrelay with a postgres sink, for ../shared/bench.
# Install: bench/install.sh (copies this file into the harness's systems/).
#
# walrelay creates the target tables from the source catalog, copies the existing rows in
# the slot's exported snapshot (parallel binary COPY), then streams: sys_setup only starts
# it; the copy is done when its slot turns active (streaming starts after the copy).
SYS_WORKLOADS="W1 W2 W3"
WALRELAY_BIN=${WALRELAY_BIN:-/work/main/target/release/walrelay}

wr_dir() { echo "$WORK_DIR/$SYSTEM"; }
wr_pid() { cat "$(wr_dir)/walrelay.pid" 2>/dev/null; }

sys_version() { "$WALRELAY_BIN" --version; }

wr_config() {
  local tables="" t
  for t in $BENCH_TABLES; do tables+="\"public.$t\", "; done
  cat >"$(wr_dir)/walrelay.toml" <<CONF
[source]
url = "host=127.0.0.1 port=$SRC_PORT dbname=$BENCH_DB user=$PGUSER sslmode=disable"
slot = "walrelay_bench"
publication = "walrelay_bench"
tables = [${tables%, }]
spill_dir = "$(wr_dir)/spill"

# pgcopydb runs 4 jobs by default on this box; walrelay gets as many (its own default is
# the number of cores).
[snapshot]
parallel = ${WALRELAY_PARALLEL:-4}

# WALRELAY_DDL=off measures the relay without DDL capture (its event triggers, and the
# messages it asks of the stream).
[ddl]
mode = "${WALRELAY_DDL:-auto}"

[[sink]]
type = "postgres"
url = "host=127.0.0.1 port=$DST_PORT dbname=$BENCH_DB user=$PGUSER sslmode=disable"
CONF
}

wr_launch() {
  setsid "$WALRELAY_BIN" run --config "$(wr_dir)/walrelay.toml" >>"$LOG_DIR/walrelay-run.log" 2>&1 </dev/null &
  echo $! >"$(wr_dir)/walrelay.pid"
}

# Wait until walrelay streams (after its copy, if any).
wr_wait_streaming() {
  local i
  for ((i = 0; i < 36000; i++)); do
    [ "$(q "$SRC_PORT" "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walrelay_bench' AND active")" = 1 ] && return 0
    kill -0 "$(wr_pid)" 2>/dev/null || { log "walrelay exited; see $LOG_DIR/walrelay-run.log"; return 1; }
    sleep 0.1
  done
  return 1
}

wr_start() { wr_launch && wr_wait_streaming; }

wr_stop() {
  local pid i; pid=$(wr_pid) || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 600; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

sys_setup() {
  wr_config
  wr_launch
}

sys_wait_copy() { wr_wait_streaming; }

sys_pause() { wr_stop; }
sys_resume() { wr_start; }

sys_teardown() {
  wr_stop
  q "$SRC_PORT" "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'walrelay_bench'" || true
  q "$SRC_PORT" "DROP PUBLICATION IF EXISTS walrelay_bench" || true
}
