#!/usr/bin/env bash
# Build walrelay in release mode and add it as a system to the shared benchmark harness.
#   bench/install.sh [HARNESS_DIR]     (default: ../shared/bench next to this repository)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
harness=${1:-$repo/../shared/bench}
cargo build --release --manifest-path "$repo/Cargo.toml" --bin walrelay
# Two systems: logical decoding (walrelay) and trigger capture (walrelay-trigger).
for system in walrelay walrelay-trigger; do
  sed "s|^WALRELAY_BIN=.*|WALRELAY_BIN=\${WALRELAY_BIN:-$repo/target/release/walrelay}|" \
    "$repo/bench/$system.sh" >"$harness/systems/$system.sh"
  echo "installed $harness/systems/$system.sh"
done
echo "run e.g. (cd $harness && SYSTEMS=\"native walrelay slony walrelay-trigger\" ./run-all.sh)"
