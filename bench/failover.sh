#!/usr/bin/env bash
# Failover time of `walrelay ha` against Patroni, through HAProxy, RUNS times each:
#   bench/failover.sh             RUNS=10 SETUPS="walrelay patroni patroni-fast"
# Setups (each a cluster of three local PostgreSQL 15 nodes, one agent process per node, all
# on the same single etcd and behind the same HAProxy):
#   walrelay      `walrelay ha` with its defaults (ttl 8 s, loop_wait 1 s, retry_timeout 3 s)
#   patroni       Debian's Patroni with its defaults (ttl 30 s, loop_wait 10 s, retry_timeout 10 s)
#   patroni-fast  Patroni with walrelay's default timings (ttl 8, loop_wait 1, retry_timeout 3)
#   walrelay-relay  `walrelay ha` in synchronous mode, with a relay (`walrelay run`) that
#                 captures the probe table from all three nodes (target_session_attrs=
#                 read-write) into a fourth PostgreSQL, the target; measured besides the
#                 failover: from the kill to the first row written on the new primary being
#                 on the target (relay_s). Not in the default SETUPS.
# One measurement: a fresh cluster is bootstrapped and waited for (a leader, two streaming
# replicas, a probe table replayed on both), a writer INSERTs through HAProxy every
# WRITE_INTERVAL seconds, then the leader's agent and its postmaster get kill -9 together.
# The failover time is from the kill to the end of the first successful INSERT that was
# started after it. The cluster is then torn down; runs are interleaved over the setups
# (run 1 of each, then run 2 of each, ...) so that drift in the machine's speed hits all alike.
# Per-run lines and a median / max table go to stderr / stdout; JSON lines (one per run, one
# summary per setup) to $RESULTS_FILE (default ../shared/bench/results/<stamp>-failover.json).
# Needs root (PostgreSQL and Patroni run as the postgres OS user), a release build of walrelay
# (cargo build --release) and: apt-get install -y etcd-server haproxy patroni python3-etcd jq curl
# Knobs: RUNS, SETUPS, WALRELAY (binary), PORT_BASE (26000: first port tried), FSYNC (on),
# WRITE_INTERVAL (0.05), SETTLE (3: seconds of writes before the kill), CLUSTER_TIMEOUT (240),
# FAILOVER_TIMEOUT (180), KEEP_LOGS (1: keep agent and server logs in the work directory).
set -euo pipefail
export LC_ALL=C   # $EPOCHREALTIME and awk must use a decimal point
repo=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$repo/../shared/bench}
runs=${RUNS:-10}
setups=${SETUPS:-walrelay patroni patroni-fast}
bin=${WALRELAY:-${WALRELAY_BIN:-$repo/target/release/walrelay}}
pgbin=${PGBIN:-/usr/lib/postgresql/15/bin}
fsync=${FSYNC:-on}
write_interval=${WRITE_INTERVAL:-0.05}
settle=${SETTLE:-3}
cluster_timeout=${CLUSTER_TIMEOUT:-240}
failover_timeout=${FAILOVER_TIMEOUT:-180}
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
results=${RESULTS_FILE:-$harness/results/$stamp-failover.json}
# walrelay's defaults (crates/walrelay/src/config/ha.rs), given to patroni-fast; walrelay
# itself gets no timing keys, so that what is measured is what a user gets.
fast_ttl=8 fast_loop_wait=1 fast_retry_timeout=3
# Patroni's own defaults (patroni/config.py), left unset for `patroni`; recorded in the JSON.
patroni_ttl=30 patroni_loop_wait=10 patroni_retry_timeout=10
# Both use the same superuser password (walrelay's default), so one writer works for all.
password=walrelay
export PGPASSWORD=$password PGCONNECT_TIMEOUT=2
unset PGHOST PGPORT PGDATABASE PGUSER PGSERVICE PGOPTIONS PGSSLMODE

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# ---------------------------------------------------------------- prerequisites

[ "$(id -u)" = 0 ] || die "run as root: PostgreSQL and Patroni are started as the postgres OS user"
id postgres >/dev/null 2>&1 || die "no OS user postgres: apt-get install -y postgresql-15"
[ -x "$pgbin/postgres" ] || die "no PostgreSQL 15 in $pgbin: apt-get install -y postgresql-15"
missing=""
for c in etcd haproxy psql jq curl setpriv; do command -v "$c" >/dev/null || missing+=" $c"; done
[ -z "$missing" ] || die "missing:$missing (apt-get install -y etcd-server haproxy postgresql-client-15 jq curl util-linux)"
for s in $setups; do
  case $s in
    walrelay | walrelay-relay)
      if [ ! -x "$bin" ]; then
        echo "no walrelay binary at $bin; build it first:" >&2
        echo "  (cd $repo && cargo build --release --bin walrelay)     or set WALRELAY=/path/to/walrelay" >&2
        exit 1
      fi
      "$bin" ha --help >/dev/null 2>&1 || die "$bin has no 'ha' command: rebuild it (cargo build --release)"
      ;;
    patroni | patroni-fast)
      [ -x /usr/bin/patroni ] || die "no /usr/bin/patroni: apt-get install -y patroni python3-etcd"
      # Patroni's etcd3 DCS is built on python-etcd's client (Debian: python3-etcd, one of
      # the alternatives patroni depends on, so it may be missing if another was chosen).
      /usr/bin/python3 -c 'import etcd' 2>/dev/null || die "Patroni's python lacks python-etcd: apt-get install -y python3-etcd"
      ;;
    *) die "unknown setup $s (walrelay, patroni, patroni-fast, walrelay-relay)" ;;
  esac
done

# ---------------------------------------------------------------- ports and directories

# PORT_BASE upwards, below the kernel's ephemeral range (so that no client connection of
# this benchmark can hold one of them as its local port while a server is down), each
# checked by binding it. Ten: etcd client and peer, HAProxy, PostgreSQL + REST API for
# three nodes, and walrelay-relay's target; every setup reuses them, one cluster at a time.
read -r etcd_port etcd_peer_port hap_port p1 p2 p3 a1 a2 a3 target_port < <(
  /usr/bin/python3 - "${PORT_BASE:-26000}" 10 <<'PY'
import socket, sys
base, n = int(sys.argv[1]), int(sys.argv[2])
ports, socks = [], []
for port in range(base, 32000):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        continue
    socks.append(s)
    ports.append(port)
    if len(ports) == n:
        break
print(" ".join(map(str, ports)))
PY
) || true
[ -n "${target_port:-}" ] || die "could not find 10 free ports from ${PORT_BASE:-26000}"
pg_port=(- "$p1" "$p2" "$p3")
api_port=(- "$a1" "$a2" "$a3")

# 0755 so that the postgres user can reach the node directories inside.
work=$(mktemp -d /tmp/walrelay-failover.XXXXXX)
chmod 755 "$work"
logs=$work/logs
run_dir=$work/run         # the current cluster: node directories, configs, pid files
mkdir -p "$logs"
mkdir -p "$(dirname "$results")"

# ---------------------------------------------------------------- processes

# spawn PIDFILE LOG CMD...: a daemon in a session of its own (a Ctrl-C at the terminal
# reaches only this script, whose trap then stops everything in order). The process writes
# its own pid before exec'ing CMD, so the pid file names the daemon itself whatever setsid
# or setpriv do.
spawn() {
  local pidfile=$1 logfile=$2 i
  shift 2
  rm -f "$pidfile"
  # shellcheck disable=SC2016  # $$, $0 and $@ are the inner shell's
  setsid sh -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" >"$logfile" 2>&1 </dev/null &
  disown $!   # no "Killed" notices from bash when the benchmark kills it
  for ((i = 0; i < 200; i++)); do
    [ -s "$pidfile" ] && return 0
    sleep 0.05
  done
  die "could not start $*"
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { cat "$1" 2>/dev/null || true; }

# stop_pids SECONDS PID...: SIGTERM, then SIGKILL whatever still runs after SECONDS.
stop_pids() {
  local secs=$1 p i left
  shift
  for p in "$@"; do
    if alive "$p"; then kill -TERM "$p" 2>/dev/null || true; fi
  done
  for ((i = 0; i < secs * 10; i++)); do
    left=0
    for p in "$@"; do alive "$p" && left=1; done
    [ $left = 0 ] && return 0
    sleep 0.1
  done
  for p in "$@"; do
    if alive "$p"; then kill -KILL "$p" 2>/dev/null || true; fi
  done
  return 0
}

# pg_stop DATA_DIR: immediate stop of a server left running (by its data directory).
pg_stop() {
  local pm
  [ -f "$1/postmaster.pid" ] || return 0
  pm=$(head -1 "$1/postmaster.pid" 2>/dev/null || true)
  alive "$pm" || return 0
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$1" -m immediate -w -t 60 stop >/dev/null 2>&1 || true
  if alive "$pm"; then kill -KILL "$pm" 2>/dev/null || true; fi
  return 0
}

# ---------------------------------------------------------------- etcd and HAProxy

start_etcd() {
  local url=http://127.0.0.1:$etcd_port peer=http://127.0.0.1:$etcd_peer_port i
  spawn "$work/etcd.pid" "$logs/etcd.log" etcd --name failover --data-dir "$work/etcd" \
    --listen-client-urls "$url" --advertise-client-urls "$url" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "failover=$peer"
  for ((i = 0; i < 300; i++)); do
    curl -s -m 1 "$url/health" 2>/dev/null | grep -q '"health":"true"' && return 0
    sleep 0.1
  done
  die "etcd did not start: $(tail -5 "$logs/etcd.log")"
}

# The HAProxy configuration of walrelay's own failover test (crates/walrelay/tests/ha.rs):
# connections go to the node whose REST API answers 200 on /primary, checked every 500 ms,
# down after 2 failed checks, up after 1 good one. One HAProxy for every setup: each cluster
# uses the same ports.
start_haproxy() {
  local i cfg=$work/haproxy.cfg
  {
    printf 'global\n  maxconn 100\n'
    printf 'defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n'
    printf 'listen primary\n  bind 127.0.0.1:%s\n' "$hap_port"
    printf '  option httpchk GET /primary\n  http-check expect status 200\n'
    printf '  default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions\n'
    for i in 1 2 3; do
      printf '  server n%s 127.0.0.1:%s check port %s\n' "$i" "${pg_port[$i]}" "${api_port[$i]}"
    done
  } >"$cfg"
  haproxy -c -q -f "$cfg" || die "haproxy rejects $cfg"
  spawn "$work/haproxy.pid" "$logs/haproxy.log" haproxy -db -f "$cfg"
}

# ---------------------------------------------------------------- clusters

# A cluster's names are new for every run (walrelay's cluster name, Patroni's scope), so that
# nothing a torn-down cluster left in etcd (keys whose leases have not yet run out) is seen by
# the next one; etcd itself is thrown away at exit.
start_walrelay() {
  local cluster=$1 tag=$2 extra=${3:-} i cfg
  for i in 1 2 3; do
    cfg=$run_dir/n$i.toml
    cat >"$cfg" <<TOML
[node]
name = "n$i"
base_dir = "$run_dir/n$i"
port = ${pg_port[$i]}
api = "127.0.0.1:${api_port[$i]}"

[cluster]
name = "$cluster"
namespace = "failover"
etcd = ["http://127.0.0.1:$etcd_port"]
$extra

[postgres]
# Set explicitly: a new cluster refuses the documented defaults left implicit.
superuser_password = "walrelay"
replication_password = "walrelay"
settings = { fsync = "$fsync" }
TOML
  done
  # All agents at once: one wins the bootstrap, the others clone from it.
  for i in 1 2 3; do
    spawn "$run_dir/n$i.agent.pid" "$logs/$tag-n$i.log" "$bin" ha --config "$run_dir/n$i.toml"
  done
}

# start_patroni CLUSTER TAG [TTL LOOP_WAIT RETRY_TIMEOUT]: without timings, Patroni's defaults.
# PostgreSQL gets what `walrelay ha` gives its servers (crates/walrelay/src/pg/local.rs and
# ha/node.rs): initdb with UTF8 and locale C, scram for TCP, wal_level logical, the same
# sizes, wal_keep_size, pg_rewind on.
start_patroni() {
  local cluster=$1 tag=$2 ttl=${3:-} loop_wait=${4:-} retry_timeout=${5:-} i base cfg timings=""
  if [ -n "$ttl" ]; then
    timings="    ttl: $ttl
    loop_wait: $loop_wait
    retry_timeout: $retry_timeout"
  fi
  for i in 1 2 3; do
    base=$run_dir/n$i
    cfg=$run_dir/n$i.yml
    mkdir -p "$base"
    chown postgres: "$base"
    cat >"$cfg" <<YAML
scope: $cluster
namespace: /failover/
name: n$i
restapi:
  listen: 127.0.0.1:${api_port[$i]}
  connect_address: 127.0.0.1:${api_port[$i]}
etcd3:
  hosts: 127.0.0.1:$etcd_port
  protocol: http
bootstrap:
  dcs:
$timings
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: logical
        hot_standby: 'on'
        wal_log_hints: 'on'
        wal_keep_size: 256MB
        max_wal_senders: 20
        max_replication_slots: 20
        max_connections: 60
        shared_buffers: 64MB
        fsync: '$fsync'
  initdb:
    - encoding: UTF8
    - locale: C
    - auth-local: trust
    - auth-host: scram-sha-256
postgresql:
  listen: 127.0.0.1:${pg_port[$i]}
  connect_address: 127.0.0.1:${pg_port[$i]}
  data_dir: $base/data
  bin_dir: $pgbin
  pgpass: $base/pgpass
  authentication:
    superuser:
      username: postgres
      password: $password
    replication:
      username: replicator
      password: $password
  parameters:
    unix_socket_directories: '$base'
  pg_hba:
    - local all all trust
    - local replication all trust
    - host all all 127.0.0.1/32 scram-sha-256
    - host replication replicator 127.0.0.1/32 scram-sha-256
watchdog:
  mode: 'off'
YAML
    chmod 644 "$cfg"
  done
  # setpriv execs (runuser would stay as a parent, and kill -9 of it would not reach Patroni).
  for i in 1 2 3; do
    spawn "$run_dir/n$i.agent.pid" "$logs/$tag-n$i.log" \
      setpriv --reuid=postgres --regid=postgres --init-groups \
      env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/postgresql USER=postgres LOGNAME=postgres LANG=C.UTF-8 \
      /usr/bin/patroni "$run_dir/n$i.yml"
  done
}

# walrelay-relay's target: one server for the whole benchmark, emptied before every run.
start_target() {
  local dir=$work/target
  mkdir -p "$dir"
  chown postgres: "$dir"
  runuser -u postgres -- "$pgbin/initdb" -D "$dir/data" -A trust -U postgres --no-sync >"$logs/target-initdb.log" 2>&1 ||
    die "initdb of the target failed: $(tail -3 "$logs/target-initdb.log")"
  # Its log in its own directory: the postgres user cannot write to $logs.
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-p $target_port -k $dir -c listen_addresses=127.0.0.1 -c fsync=$fsync" start >/dev/null ||
    die "the target did not start: $(tail -3 "$dir/server.log")"
}

# Start the relay of a walrelay-relay run, from every node to the (emptied) target.
start_relay() {
  local tag=$1 cfg=$run_dir/relay.toml
  sql "$target_port" "DROP TABLE IF EXISTS failover_probe; DROP SCHEMA IF EXISTS walrelay CASCADE;
    SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = 'walrelay/postgres'" >/dev/null
  cat >"$cfg" <<TOML
[source]
url = "postgresql://postgres:$password@127.0.0.1:$p1,127.0.0.1:$p2,127.0.0.1:$p3/postgres?sslmode=disable&target_session_attrs=read-write"
tables = ["public.failover_probe"]
spill_dir = "$run_dir/spill"

[[sink]]
type = "postgres"
url = "postgresql://postgres@127.0.0.1:$target_port/postgres?sslmode=disable"
TOML
  spawn "$run_dir/relay.pid" "$logs/$tag-relay.log" "$bin" run --config "$cfg"
}

# The relay streams into the target and both replicas hold a ready copy of its slot.
wait_relay_ready() {
  local deadline=$((SECONDS + 120)) rows ready
  while ((SECONDS < deadline)); do
    alive "$(pid_of "$run_dir/relay.pid")" || { log "the relay exited: $(tail -3 "$logs/$1-relay.log")"; return 1; }
    rows=$(sql "$target_port" "SELECT count(*) FROM failover_probe" 2>/dev/null || echo 0)
    ready=$("$bin" ctl --config "$run_dir/n1.toml" list 2>/dev/null | grep -c "walrelay ready" || true)
    if [ "$rows" -gt 0 ] && [ "$ready" = 2 ]; then return 0; fi
    sleep 0.2
  done
  log "relay not ready (target rows $rows, ready copies $ready)"
  return 1
}

data_dir() { echo "$run_dir/n$1/data"; }
agent_pid() { pid_of "$run_dir/n$1.agent.pid"; }
postmaster_pid() { head -1 "$(data_dir "$1")/postmaster.pid" 2>/dev/null || true; }

# Stop the current cluster whatever state it is in, and remove it (its logs stay in $logs).
# SIGTERM first: both agents then stop their PostgreSQL; pg_ctl -m immediate for whatever a
# killed or stuck agent left running.
teardown_cluster() {
  local tag=${1:-} i
  [ -d "$run_dir" ] || return 0
  stop_pids 30 "$(pid_of "$run_dir/relay.pid")"
  stop_pids 30 "$(agent_pid 1)" "$(agent_pid 2)" "$(agent_pid 3)"
  for i in 1 2 3; do pg_stop "$(data_dir "$i")"; done
  for i in 1 2 3; do
    # walrelay's server log (Patroni's servers log into the agent's output).
    if [ -n "$tag" ] && [ -f "$run_dir/n$i/server.log" ]; then
      cp "$run_dir/n$i/server.log" "$logs/$tag-n$i.server.log" 2>/dev/null || true
    fi
  done
  rm -rf "$run_dir"
}

# ---------------------------------------------------------------- SQL and health

conn() { echo "host=127.0.0.1 port=$1 dbname=postgres user=postgres sslmode=disable connect_timeout=2"; }
sql() { timeout 10 psql -X -q -At -v ON_ERROR_STOP=1 "$(conn "$1")" -c "$2"; }

# HTTP status of node I's REST API at PATH ("000" when it does not answer).
api_code() { curl -s -o /dev/null -m 1 -w '%{http_code}' "http://127.0.0.1:${api_port[$1]}$2" 2>/dev/null || true; }

# wait_healthy: a leader (/primary 200), both others replicas (/replica 200) that stream
# from it (pg_stat_replication, as Patroni's /replica does not check that); prints the
# leader's number. Fails early if an agent exits.
wait_healthy() {
  local deadline=$((SECONDS + cluster_timeout)) i leader replicas streaming
  while ((SECONDS < deadline)); do
    for i in 1 2 3; do
      alive "$(agent_pid "$i")" || { log "agent n$i exited"; return 1; }
    done
    leader="" replicas=0
    for i in 1 2 3; do
      if [ "$(api_code "$i" /primary)" = 200 ]; then leader=$i; fi
      if [ "$(api_code "$i" /replica)" = 200 ]; then replicas=$((replicas + 1)); fi
    done
    if [ -n "$leader" ] && [ "$replicas" = 2 ]; then
      streaming=$(sql "${pg_port[$leader]}" "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'" 2>/dev/null || echo 0)
      if [ "$streaming" = 2 ]; then
        echo "$leader"
        return 0
      fi
    fi
    sleep 0.5
  done
  log "no healthy cluster after ${cluster_timeout}s"
  return 1
}

# The probe table, created through HAProxy (which also shows HAProxy sees the leader), then
# replayed on both replicas, so that both are eligible (within maximum_lag_on_failover).
prepare_table() {
  local leader=$1 deadline=$((SECONDS + 60)) n
  until sql "$hap_port" "CREATE TABLE IF NOT EXISTS failover_probe (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "cannot create the probe table through HAProxy"; return 1; }
    sleep 0.2
  done
  while ((SECONDS < deadline)); do
    n=$(sql "${pg_port[$leader]}" "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND replay_lsn >= pg_current_wal_lsn()" 2>/dev/null || echo 0)
    [ "$n" = 2 ] && return 0
    sleep 0.1
  done
  log "replicas did not replay the probe table"
  return 1
}

# ---------------------------------------------------------------- the writer

# writer FILE: one INSERT through HAProxy per psql call (a new connection each time, as a
# client that reconnects would make), every WRITE_INTERVAL s, one line per attempt:
#   <start epoch> <end epoch> ok|fail <server port> <row id>
# Stops when FILE.stop exists, or after 15 minutes whatever happens.
writer() {
  local out=$1 t0 port deadline=$((SECONDS + 900))
  local c
  c="$(conn "$hap_port")"
  while [ ! -e "$out.stop" ] && ((SECONDS < deadline)); do
    t0=$EPOCHREALTIME
    if port=$(PGOPTIONS='-c statement_timeout=2000' timeout 5 psql -X -q -At "$c" \
      -c "INSERT INTO failover_probe DEFAULT VALUES RETURNING inet_server_port() || ' ' || id" 2>/dev/null); then
      echo "$t0 $EPOCHREALTIME ok $port" >>"$out"
    else
      echo "$t0 $EPOCHREALTIME fail -" >>"$out"
    fi
    sleep "$write_interval"
  done
}

writer_pid="" writer_log=""
start_writer() {
  writer_log=$1
  rm -f "$writer_log" "$writer_log.stop"
  writer "$writer_log" &
  writer_pid=$!
}
stop_writer() {
  [ -n "$writer_pid" ] || return 0
  touch "$writer_log.stop"
  wait "$writer_pid" 2>/dev/null || true
  rm -f "$writer_log.stop"
  writer_pid=""
}

ok_count() { awk '$3 == "ok"' "$1" 2>/dev/null | wc -l; }

# ---------------------------------------------------------------- one measurement

declare -A version
for s in $setups; do
  case $s in
    walrelay | walrelay-relay) version[$s]=$("$bin" --version 2>&1 | head -1) ;;
    *) version[$s]=$(/usr/bin/patroni --version 2>&1 | head -1) ;;
  esac
done

# record SETUP RUN JSON_FIELDS...: one JSON line for a run, printed and appended.
record() {
  local setup=$1 run=$2 ttl lw rt
  shift 2
  case $setup in
    walrelay | walrelay-relay | patroni-fast) ttl=$fast_ttl lw=$fast_loop_wait rt=$fast_retry_timeout ;;
    patroni) ttl=$patroni_ttl lw=$patroni_loop_wait rt=$patroni_retry_timeout ;;
  esac
  # The fixed fields are passed as $_* so that the run's own (given as "$@") are the rest.
  jq -c -n --arg _stamp "$stamp" --arg _setup "$setup" --argjson _run "$run" \
    --arg _version "${version[$setup]}" --argjson _ttl "$ttl" --argjson _loop_wait "$lw" \
    --argjson _retry_timeout "$rt" --arg _fsync "$fsync" "$@" '
    {workload: "failover", stamp: $_stamp, setup: $_setup, run: $_run, version: $_version,
     ttl_s: $_ttl, loop_wait_s: $_loop_wait, retry_timeout_s: $_retry_timeout, fsync: $_fsync}
    + ($ARGS.named | with_entries(select(.key | startswith("_") | not)))
    | .failover_s = (if (.failover_s // "") == "" then null else (.failover_s | tonumber) end)
    | if has("relay_s") then .relay_s = (if .relay_s == "" then null else (.relay_s | tonumber) end) else . end
    | .ok = (.failover_s != null)' >>"$results"
  tail -1 "$results" >&2
}

run_one() {
  local setup=$1 run=$2 tag="$1-r$2" cluster leader old_pm old_agent wlog t_kill line i
  cluster="fo_${setup//-/_}_r${run}_$$"
  log "$tag: bootstrapping a 3-node cluster ($cluster)"
  rm -rf "$run_dir"
  mkdir -p "$run_dir"
  case $setup in
    walrelay) start_walrelay "$cluster" "$tag" ;;
    walrelay-relay) start_walrelay "$cluster" "$tag" "synchronous_mode = true" ;;
    patroni) start_patroni "$cluster" "$tag" ;;
    patroni-fast) start_patroni "$cluster" "$tag" "$fast_ttl" "$fast_loop_wait" "$fast_retry_timeout" ;;
  esac
  if ! leader=$(wait_healthy); then
    record "$setup" "$run" --arg failover_s "" --arg error "cluster not healthy"
    teardown_cluster "$tag"
    return 0
  fi
  if ! prepare_table "$leader"; then
    record "$setup" "$run" --arg failover_s "" --arg error "probe table"
    teardown_cluster "$tag"
    return 0
  fi
  if [ "$setup" = walrelay-relay ]; then
    start_relay "$tag"
  fi
  log "$tag: healthy, leader n$leader; writing through HAProxy"

  wlog=$logs/$tag-writes.txt
  start_writer "$wlog"
  # Steady state first: writes go through (HAProxy routes to the leader), for SETTLE s.
  local deadline=$((SECONDS + 60))
  until [ "$(ok_count "$wlog")" -ge 5 ]; do
    if ((SECONDS >= deadline)); then
      stop_writer
      record "$setup" "$run" --arg failover_s "" --arg error "no writes through HAProxy before the kill"
      teardown_cluster "$tag"
      return 0
    fi
    sleep 0.1
  done
  if [ "$setup" = walrelay-relay ] && ! wait_relay_ready "$tag"; then
    stop_writer
    record "$setup" "$run" --arg failover_s "" --arg relay_s "" --arg error "relay not ready"
    teardown_cluster "$tag"
    return 0
  fi
  case $setup in
    walrelay*) "$bin" ctl --config "$run_dir/n1.toml" list >"$logs/$tag-ctl-list.txt" 2>&1 || true ;;
  esac
  sleep "$settle"

  # The leader may not have changed meanwhile (a failover before the kill would be
  # measured as nothing).
  if [ "$(api_code "$leader" /primary)" != 200 ]; then
    stop_writer
    record "$setup" "$run" --arg failover_s "" --arg error "leader changed before the kill"
    teardown_cluster "$tag"
    return 0
  fi
  old_agent=$(agent_pid "$leader")
  old_pm=$(postmaster_pid "$leader")
  if ! alive "$old_agent" || ! alive "$old_pm"; then
    die "$tag: leader n$leader's agent ($old_agent) or postmaster ($old_pm) not running"
  fi
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  t_kill=$EPOCHREALTIME
  kill -KILL "$old_agent" "$old_pm"
  log "$tag: killed n$leader (agent $old_agent, postmaster $old_pm)"

  # The first INSERT that started after the kill and succeeded; its end is the failover's end.
  deadline=$((SECONDS + failover_timeout))
  line=""
  while [ -z "$line" ] && ((SECONDS < deadline)); do
    sleep 0.1
    line=$(awk -v t="$t_kill" '$1 >= t && $3 == "ok" { printf "%.3f %s %s\n", $2 - t, $4, $5; exit }' "$wlog")
  done
  stop_writer

  local failover_s="" new_port="" new_id="" new_leader="" fails relay=()
  if [ -n "$line" ]; then
    read -r failover_s new_port new_id <<<"$line"
    for i in 1 2 3; do
      if [ "${pg_port[$i]}" = "$new_port" ]; then new_leader=n$i; fi
    done
  fi
  fails=$(awk -v t="$t_kill" '$1 >= t && $3 == "fail"' "$wlog" | wc -l)
  if [ "$setup" = walrelay-relay ]; then
    # The first row written on the new primary, on the target: polled every 50 ms.
    local relay_s=""
    if [ -n "$new_id" ]; then
      while ((SECONDS < deadline)); do
        if [ "$(sql "$target_port" "SELECT count(*) FROM failover_probe WHERE id = $new_id" 2>/dev/null)" = 1 ]; then
          relay_s=$(awk -v t="$t_kill" -v n="$EPOCHREALTIME" 'BEGIN { printf "%.3f", n - t }')
          break
        fi
        sleep 0.05
      done
    fi
    log "$tag: the first row written on the new primary reached the target ${relay_s:-never}s after the kill"
    relay=(--arg relay_s "$relay_s")
  fi
  if [ -z "$failover_s" ]; then
    log "$tag: no write went through within ${failover_timeout}s of the kill"
    record "$setup" "$run" --arg failover_s "" --arg error "no write after ${failover_timeout}s" \
      --arg old_leader "n$leader" --argjson failed_writes "$fails" --argjson load1 "$load"
  elif [ "$new_leader" = "n$leader" ]; then
    # Cannot happen (its postmaster is dead); kept as a check on the measurement itself.
    record "$setup" "$run" --arg failover_s "" --arg error "write landed on the killed node" \
      --arg old_leader "n$leader"
  else
    log "$tag: failover ${failover_s}s (n$leader killed, $new_leader took the write; $fails writes failed meanwhile)"
    record "$setup" "$run" --arg failover_s "$failover_s" --arg old_leader "n$leader" \
      --arg new_leader "$new_leader" --argjson failed_writes "$fails" --argjson load1 "$load" "${relay[@]}"
  fi
  teardown_cluster "$tag"
}

# ---------------------------------------------------------------- cleanup

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_writer
  teardown_cluster "" || true
  stop_pids 10 "$(pid_of "$work/haproxy.pid")" "$(pid_of "$work/etcd.pid")"
  [ -d "$work/target/data" ] && pg_stop "$work/target/data"
  rm -rf "$work/etcd" "$run_dir"
  if [ "${KEEP_LOGS:-1}" = 1 ]; then log "logs: $logs"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- main

log "setups: $setups; $runs runs each; results -> $results"
log "ports: etcd $etcd_port, haproxy $hap_port, postgres $p1 $p2 $p3, rest api $a1 $a2 $a3; work dir $work"
start_etcd
log "$(etcd --version | head -1)"
start_haproxy
log "$(haproxy -v | head -1)"
case " $setups " in *" walrelay-relay "*) start_target ;; esac
for ((r = 1; r <= runs; r++)); do
  for s in $setups; do
    run_one "$s" "$r"
  done
done

# ---------------------------------------------------------------- summary

# One summary line per setup (median, max, min over the runs that failed over) into the
# results file, then the table.
jq -c -s --arg stamp "$stamp" --arg host "$(nproc) cores, $(. /etc/os-release && echo "$PRETTY_NAME")" \
  --arg pg "$("$pgbin/postgres" --version)" --arg etcd "$(etcd --version | head -1)" \
  --arg haproxy "$(haproxy -v | head -1)" '
  def median: sort | if length == 0 then null
    elif length % 2 == 1 then .[length / 2 | floor]
    else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  [.[] | select(.workload == "failover" and .stamp == $stamp and (.summary | not))] | group_by(.setup)[]
  | [.[] | select(.ok) | .failover_s] as $t
  | [.[] | select(.relay_s != null) | .relay_s] as $r
  | {workload: "failover", summary: true, stamp: $stamp, setup: .[0].setup, version: .[0].version,
     ttl_s: .[0].ttl_s, loop_wait_s: .[0].loop_wait_s, retry_timeout_s: .[0].retry_timeout_s,
     runs: length, ok_runs: ($t | length), times_s: [.[] | .failover_s],
     median_s: ($t | median), max_s: ($t | max), min_s: ($t | min),
     relay_median_s: ($r | median), relay_max_s: ($r | max), relay_times_s: [.[] | .relay_s],
     host: $host, postgres: $pg, etcd: $etcd, haproxy: $haproxy}' "$results" >"$work/summary.json"
cat "$work/summary.json" >>"$results"

echo
echo "Failover time, kill -9 of the leader's agent and postmaster -> first INSERT through HAProxy ($stamp):"
echo
echo "| setup | ttl / loop_wait / retry_timeout | runs ok | median s | max s | per run s |"
echo "|---|---|---|---|---|---|"
for s in $setups; do
  jq -r --arg s "$s" 'select(.setup == $s) |
    "| \(.setup) (\(.version)) | \(.ttl_s) / \(.loop_wait_s) / \(.retry_timeout_s) s | \(.ok_runs)/\(.runs) | \(.median_s // "-") | \(.max_s // "-") | \(.times_s | map(. // "fail" | tostring) | join(", ")) |"' \
    "$work/summary.json"
done
if jq -e 'select(.relay_median_s != null)' "$work/summary.json" >/dev/null; then
  echo
  echo "Relay: kill -9 -> the first row written on the new primary on the target:"
  echo
  jq -r 'select(.relay_median_s != null) |
    "\(.setup): median \(.relay_median_s) s, max \(.relay_max_s) s; per run \(.relay_times_s | map(. // "never" | tostring) | join(", "))"' \
    "$work/summary.json"
fi
echo
log "results: $results"
