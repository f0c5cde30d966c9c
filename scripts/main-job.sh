#!/usr/bin/env bash
# weft's main job on this machine: set up, then check a small Samba spec, show its typed graph
# and its per-layer costs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
weft=target/release/weft
spec=specs/tiny/samba-tiny.weft

echo
echo "== $weft check $spec --seq 512"
"$weft" check "$spec" --seq 512
echo
echo "== $weft graph $spec (first lines)"
"$weft" graph "$spec" | head -n 30
echo
echo "== $weft check specs/samba-421m.weft (the paper's Samba 421M)"
"$weft" check specs/samba-421m.weft | tail -n 3
