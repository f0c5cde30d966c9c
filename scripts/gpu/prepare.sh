#!/usr/bin/env bash
# Builds what the GPU machine runs, into gpu-out/ (git-ignored, carried by the device call):
# weft-run; the GPU check's bundles (every tiny spec and the cases in scripts/gpu/cases/ at
# scripts/gpu/check.toml, Samba-421M at scripts/gpu/check-421m.toml); Samba 421M and 1.3B at the
# paper's training shape for the benchmark; samba-micro with Moby-Dick token shards (the main
# job's BPE tokenizer) for the training, determinism and kill-and-resume runs. With
# BASELINE=COMMIT it also builds that commit's weft-run and Samba-421M bundle into
# gpu-out/baseline/, so the benchmark compares both in one call. samba-tiny and llama-tiny with
# the State of the Union split for perplexity against context length. Then run `gpu-out/run.sh` there.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --bin weft && cargo build --release -p weft-runtime --bin weft-run
out=gpu-out
rm -rf "$out" && mkdir -p "$out"
cp target/release/weft-run "$out/"
build() { ./target/release/weft build "$1" --config "$2" -o "$out/$3.bundle" >/dev/null; }
for s in samba-tiny samba-micro llama-tiny mistral-tiny mamba-tiny mamba-swa-mlp-tiny mlp2-swa-mlp-tiny samba-nope-tiny mamba-mlp-tiny; do
  build "specs/tiny/$s.weft" scripts/gpu/check.toml "$s"
done
for c in scripts/gpu/cases/*.weft; do
  build "$c" scripts/gpu/check.toml "$(basename "$c" .weft)"
done
build specs/samba-421m.weft scripts/gpu/check-421m.toml samba-421m-check
for s in samba-421m samba-1.3b; do
  build "specs/$s.weft" scripts/gpu/bench.toml "$s"
done
# Generation up to 256 sequences (the decode benchmark sweeps 1 to 256).
build specs/samba-421m.weft scripts/gpu/decode-b256.toml samba-421m-b256
# Serving under load: 64 slots.
build specs/samba-421m.weft scripts/gpu/serve-421m.toml serve-421m
# samba-micro as the main job trains it: its tokenizer (trained by the CPU run's data loading),
# the corpus split as the CPU run splits it (the last 5% of the chapters held out).
config=examples/samba-micro.toml
if [ ! -f runs/samba-micro/tokenizer.json ]; then
  ./target/release/weft train --config "$config" --backend cpu --steps 0 --no-progress >/dev/null
fi
build specs/tiny/samba-micro.weft "$config" samba-micro-train
cp runs/samba-micro/tokenizer.json "$out/"
# The engine and server checks' run: samba-micro after 40 CPU steps (trained once, kept in runs/).
serve=scripts/gpu/micro-serve.toml
[ -f runs/micro-serve/latest ] || ./target/release/weft train --config "$serve" --backend cpu --no-progress >/dev/null
build specs/tiny/samba-micro.weft "$serve" micro-serve
mkdir -p "$out/micro-serve-run"
cp runs/micro-serve/{run.json,tokenizer.json,latest} "$out/micro-serve-run/"
cp -r "runs/micro-serve/$(cat runs/micro-serve/latest)" "$out/micro-serve-run/"
cp scripts/gpu/serve_check.py "$out/"
mapfile -t files < <(ls data/corpus/moby-dick/chapter-*.txt | sort)
n=${#files[@]}
nv=$(( (n * 5 + 99) / 100 ))
./target/release/weft shard --tokenizer runs/samba-micro/tokenizer.json --out "$out/moby-train.tokens" "${files[@]:0:n-nv}"
./target/release/weft shard --tokenizer runs/samba-micro/tokenizer.json --out "$out/moby-valid.tokens" "${files[@]:n-nv}"
if [ -n "${BASELINE:-}" ]; then
  # The baseline's binaries, built in a worktree of that commit (kept between runs).
  wt=${BASELINE_DIR:-/tmp/weft-baseline}
  [ -d "$wt" ] || git worktree add -f "$wt" "$BASELINE" >/dev/null
  (cd "$wt" && git checkout -q "$BASELINE" && cargo build --release -q --bin weft && cargo build --release -q -p weft-runtime --bin weft-run)
  mkdir -p "$out/baseline"
  cp "$wt/target/release/weft-run" "$out/baseline/"
  "$wt/target/release/weft" build specs/samba-421m.weft --config scripts/gpu/bench.toml -o "$out/baseline/samba-421m.bundle" >/dev/null
  git rev-parse --short "$BASELINE" > "$out/baseline/commit"
fi
# Perplexity against context length: the State of the Union addresses split by year (before
# 1991 to train, from 1991 on held out), one BPE tokenizer (4096 tokens, trained by a CPU run's
# data loading on the training split) for samba-tiny and llama-tiny, bundles whose `score` plan
# takes 32K-token windows.
bash scripts/corpus.sh
split=data/corpus/sotu-split
ppl=scripts/gpu/ppl.toml
if [ ! -f runs/ppl-tokenizer/tokenizer.json ]; then
  ./target/release/weft train --config "$ppl" --backend cpu --steps 0 --no-progress >/dev/null
fi
# mistral-tiny (SWA only, same size) is the passkey contrast: its window cannot reach a key far back.
for s in samba-tiny llama-tiny mistral-tiny; do build "specs/tiny/$s.weft" "$ppl" "ppl-$s"; done
# Data-parallel training: samba-tiny at two micro-batches per step (one GPU or two).
build specs/tiny/samba-tiny.weft scripts/gpu/dp.toml dp-samba-tiny
cp runs/ppl-tokenizer/tokenizer.json "$out/tokenizer-sotu.json"
mapfile -t files < <(ls "$split"/train/*.txt | sort)
n=${#files[@]}
nv=$(( (n * 5 + 99) / 100 ))
./target/release/weft shard --tokenizer "$out/tokenizer-sotu.json" --out "$out/sotu-train.tokens" "${files[@]:0:n-nv}"
./target/release/weft shard --tokenizer "$out/tokenizer-sotu.json" --out "$out/sotu-valid.tokens" "${files[@]:n-nv}"
cp -r "$split/held-out" "$out/sotu-held-out"
cp scripts/gpu/run.sh "$out/"
du -sh "$out"
