#!/usr/bin/env bash
# Builds what the GPU machine runs, into gpu-out/ (git-ignored, carried by the device call):
# the runtime binary weft-run, bundles of the tiny specs for the check, and of Samba 421M and
# 1.3B for the benchmark. Then run `bash scripts/gpu/run.sh` there.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --bin weft --bin weft-run
out=gpu-out
rm -rf "$out" && mkdir -p "$out"
cp target/release/weft-run "$out/"
for s in samba-tiny llama-tiny mistral-tiny mamba-tiny mamba-swa-mlp-tiny mlp2-swa-mlp-tiny samba-nope-tiny mamba-mlp-tiny; do
  ./target/release/weft build "specs/tiny/$s.weft" --config scripts/gpu/check.toml -o "$out/$s.bundle" >/dev/null
done
for s in samba-421m samba-1.3b; do
  ./target/release/weft build "specs/$s.weft" --config scripts/gpu/bench.toml -o "$out/$s.bundle" >/dev/null
done
cp scripts/gpu/run.sh "$out/"
du -sh "$out"
