#!/usr/bin/env bash
# Build walrelay in release mode and add it as a system to the shared benchmark harness.
#   bench/install.sh [HARNESS_DIR]     (default: ../shared/bench next to this repository)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
harness=${1:-$repo/../shared/bench}
cargo build --release --manifest-path "$repo/Cargo.toml" --bin walrelay
sed "s|^WALRELAY_BIN=.*|WALRELAY_BIN=\${WALRELAY_BIN:-$repo/target/release/walrelay}|" \
  "$repo/bench/walrelay.sh" >"$harness/systems/walrelay.sh"
echo "installed $harness/systems/walrelay.sh; run e.g. (cd $harness && SYSTEMS=\"native walrelay\" ./run-all.sh)"
