#!/usr/bin/env bash
# Sets up what is missing, then runs weft's whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Snapshots are reviewed, never written by a test run.
export INSTA_UPDATE=no
cargo test --workspace --quiet
