#!/usr/bin/env bash
# Builds what the GPU machine runs, into gpu-out/ (git-ignored, carried by the device call):
# the runtime binary weft-run, bundles of the tiny specs for the check, of Samba 421M and 1.3B
# for the benchmark, and of samba-micro with Moby-Dick token shards (the main job's BPE
# tokenizer) for a training run. Then run `gpu-out/run.sh` there.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --bin weft && cargo build --release -p weft-runtime --bin weft-run
out=gpu-out
rm -rf "$out" && mkdir -p "$out"
cp target/release/weft-run "$out/"
for s in samba-tiny llama-tiny mistral-tiny mamba-tiny mamba-swa-mlp-tiny mlp2-swa-mlp-tiny samba-nope-tiny mamba-mlp-tiny; do
  ./target/release/weft build "specs/tiny/$s.weft" --config scripts/gpu/check.toml -o "$out/$s.bundle" >/dev/null
done
# Grouped-query attention (not in the tiny specs), as Samba 1.7B and 3.8B use it.
./target/release/weft build scripts/gpu/gqa-tiny.weft --config scripts/gpu/check.toml -o "$out/gqa-tiny.bundle" >/dev/null
for s in samba-421m samba-1.3b; do
  ./target/release/weft build "specs/$s.weft" --config scripts/gpu/bench.toml -o "$out/$s.bundle" >/dev/null
done
# samba-micro as the main job trains it: its tokenizer (trained by the CPU run's data loading),
# the corpus split as the CPU run splits it (the last 5% of the chapters held out).
config=examples/samba-micro.toml
if [ ! -f runs/samba-micro/tokenizer.json ]; then
  ./target/release/weft train --config "$config" --backend cpu --steps 0 --no-progress >/dev/null
fi
./target/release/weft build specs/tiny/samba-micro.weft --config "$config" -o "$out/samba-micro.bundle" >/dev/null
cp runs/samba-micro/tokenizer.json "$out/"
mapfile -t files < <(ls data/corpus/moby-dick/chapter-*.txt | sort)
n=${#files[@]}
nv=$(( (n * 5 + 99) / 100 ))
./target/release/weft shard --tokenizer runs/samba-micro/tokenizer.json --out "$out/moby-train.tokens" "${files[@]:0:n-nv}"
./target/release/weft shard --tokenizer runs/samba-micro/tokenizer.json --out "$out/moby-valid.tokens" "${files[@]:n-nv}"
cp scripts/gpu/run.sh "$out/"
du -sh "$out"
