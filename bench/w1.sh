#!/usr/bin/env bash
# W1 only (initial copy), for several systems in one run, interleaved, RUNS times:
#   bench/w1.sh [RUNS]            SYSTEMS="pgcopydb native walrelay" by default
# Each system gets fresh clusters from the template, then the harness's W1 workload, then
# its teardown. JSON lines go to stdout and to $RESULTS_FILE (default
# ../shared/bench/results/<stamp>-w1.json). Run bench/install.sh and make-template.sh first.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$repo/../shared/bench}
runs=${1:-2}
systems=${SYSTEMS:-pgcopydb native walrelay}
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
export RESULTS_FILE=${RESULTS_FILE:-$harness/results/$stamp-w1.json}
for ((r = 1; r <= runs; r++)); do
  for system in $systems; do
    (
      set +euo pipefail   # lib.sh is written for plain bash, as run-system.sh uses it
      . "$harness/lib.sh"
      load_system "$system"
      export SYSTEM=$system
      cleanup() {
        sys_teardown >>"$LOG_DIR/$SYSTEM-teardown.log" 2>&1 || true
        bench_stop "$DST_DIR"; bench_stop "$SRC_DIR"
      }
      trap cleanup EXIT
      bench_stop "$DST_DIR"; bench_stop "$SRC_DIR"
      rm -rf "${WORK_DIR:?}/$SYSTEM"; mkdir -p "$WORK_DIR/$SYSTEM"
      [ "$(id -u)" = 0 ] && chown "$BENCH_OS_USER" "$WORK_DIR/$SYSTEM"
      bench_fresh_source "$(sys_src_conf)"
      bench_fresh_target "$(sys_dst_conf)"
      line=$("$harness/workloads/w1_initial_copy.sh")
      echo "$line"; echo "$line" >>"$RESULTS_FILE"
    )
  done
done
echo "results: $RESULTS_FILE" >&2
jq -r -s 'group_by(.system)[] | "\(.[0].system): " + ([.[] | "\(.copy_s) s (ok=\(.ok))"] | join(", "))' "$RESULTS_FILE" >&2
