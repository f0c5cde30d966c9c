#!/usr/bin/env bash
# weft's main job: set up what is missing, check a tiny Samba spec, compile it to a GPU bundle,
# train it for a few minutes on Moby-Dick (on a GPU when one is usable, else the CPU reference;
# showing the loss fall), save checkpoints, generate text.
# A run that was interrupted resumes from its newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
weft=target/release/weft
spec=specs/tiny/samba-micro.weft
config=examples/samba-micro.toml

echo
echo "== $weft check $spec --seq 256"
"$weft" check "$spec" --seq 256
echo
echo "== $weft build $spec --config $config -o runs/samba-micro.bundle"
mkdir -p runs
"$weft" build "$spec" --config "$config" -o runs/samba-micro.bundle
echo
echo "== $weft train --config $config"
"$weft" train --config "$config" --no-progress
echo
echo "== $weft generate --run runs/samba-micro --prompt 'Call me Ishmael.'"
"$weft" generate --run runs/samba-micro --prompt "Call me Ishmael." --max-new-tokens 120 --temperature 0.8 --seed 7
echo
echo "loss curve: runs/samba-micro/loss.svg, metrics: runs/samba-micro/metrics.jsonl"
