#!/usr/bin/env bash
# Every GPU check and benchmark in one go, on a machine with an NVIDIA GPU (run from the folder
# prepare.sh filled). libcuda comes from the driver; libcublasLt.so.13 is looked up in python3's
# site-packages (NVIDIA's PyPI wheel), then anywhere on the root file system.
set -uo pipefail
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
SP=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
LT=$(find $SP -name 'libcublasLt.so.13*' 2>/dev/null | head -1)
[ -z "$LT" ] && LT=$(find / -xdev -name 'libcublasLt.so.13*' 2>/dev/null | head -1)
export LD_LIBRARY_PATH="$(dirname "$LT")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
summary=()
for b in ${CHECK:-samba-tiny llama-tiny mistral-tiny mamba-tiny mamba-swa-mlp-tiny mlp2-swa-mlp-tiny samba-nope-tiny mamba-mlp-tiny gqa-tiny}; do
  echo "=== check $b"
  if ./weft-run check "$b.bundle" | tee "check-$b.log"; then summary+=("check $b: pass"); else summary+=("check $b: FAIL"); fi
done
for b in ${BENCH:-samba-421m samba-1.3b}; do
  echo "=== bench $b"
  ./weft-run bench "$b.bundle" --steps 3 | tee "bench-$b.log"
  summary+=("bench $b: $(grep -o 'MFU [0-9.]*%' "bench-$b.log" || echo failed), $(grep -o '[0-9]* tokens/s' "bench-$b.log" | head -1), prefill $(grep -o '[0-9]* tokens/s' "bench-$b.log" | sed -n 2p)")
done
if [ -z "${SKIP_TRAIN:-}" ]; then
  echo "=== train samba-micro on Moby-Dick"
  rm -rf run-micro
  if ./weft-run train samba-micro.bundle --train moby-train.tokens --valid moby-valid.tokens --out run-micro \
      --steps 300 --tokenizer tokenizer.json | tee train-micro.log; then
    summary+=("train samba-micro: $(tail -1 train-micro.log)")
    if [ -n "${OUT:-}" ]; then
      # The whole run directory (checkpoints, metrics, loss plot), for `weft generate --run`.
      cp tokenizer.json run-micro/ 2>/dev/null
      tar czf "$OUT/run-micro.tar.gz" run-micro
    fi
  else
    summary+=("train samba-micro: FAIL")
  fi
fi
if [ -n "${NCU:-}" ] && command -v ncu >/dev/null; then
  # Hardware counters of the kernels matching $NCU (a regex), from their first launches.
  b=${BENCH%% *}; b=${b:-samba-421m}
  echo "=== ncu $NCU on $b"
  ncu --clock-control none -k "regex:$NCU" -c "${NCU_COUNT:-2}" --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
    ./weft-run bench "$b.bundle" --steps 1 > ncu.log 2>&1 || echo "ncu failed (see ncu.log)"
  summary+=("ncu: $(grep -c 'Section: GPU Speed Of Light' ncu.log) kernel reports in ncu.log")
fi
echo "=== summary"
printf '%s\n' "${summary[@]}" | tee summary.log
# Everything printed above, as one archive, where the caller collects files.
if [ -n "${OUT:-}" ]; then tar czf "$OUT/logs.tar.gz" *.log; fi
