#!/usr/bin/env bash
# Every GPU check and benchmark in one go, on a machine with an NVIDIA GPU (run from the folder
# prepare.sh filled); a summary table comes last. libcuda comes from the driver; libcublasLt.so.13
# is looked up in python3's site-packages (NVIDIA's PyPI wheel), then anywhere on the root file
# system. Parts: CHECK (bundle names, or "none"), RUNS=0 skips the training runs, BENCH (bundle
# names, or "none"), DECODE (bundle names for the generation benchmark, or "none"), ENGINE=0
# skips the engine and server checks (WHEELS: a folder with the openai client), LOAD (bundle
# names served under the load generator, or "none"), PPL (tiny specs trained and scored for
# perplexity against context length, or "none"), PASSKEY (of those, tuned and asked for
# passkeys, or "none"), DP=0 skips data-parallel training through NCCL; logs go to $OUT when it
# is set.
set -uo pipefail
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
SP=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
LT=$(find $SP -name 'libcublasLt.so.13*' 2>/dev/null | head -1)
[ -z "$LT" ] && LT=$(find / -xdev -name 'libcublasLt.so.13*' 2>/dev/null | head -1)
export LD_LIBRARY_PATH="$(dirname "$LT")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# libnccl from NVIDIA's PyPI wheel, for data-parallel training.
NL=$(find $SP -path '*nvidia/nccl/lib/libnccl.so*' 2>/dev/null | head -1)
[ -n "$NL" ] && export LD_LIBRARY_PATH="$(dirname "$NL"):$LD_LIBRARY_PATH"
summary=()
note() { summary+=("$1"); }
# A call has a time limit: parts that would start after DEADLINE seconds are skipped (and said),
# and each check stops after CHECK_TIMEOUT seconds, so the summary always comes back.
DEADLINE=${DEADLINE:-540}
late() { if [ "$SECONDS" -ge "$DEADLINE" ]; then note "$1: skipped (out of time at ${SECONDS} s)"; return 0; fi; return 1; }

# ---- training runs: bit-identical repeats, SIGKILL mid-run and resume, then 300 steps ----
MICRO=(./weft-run train samba-micro-train.bundle --train moby-train.tokens --valid moby-valid.tokens
  --tokenizer tokenizer.json --log-every 50 --eval-every 50 --out)
micro() { "${MICRO[@]}" "$@"; }
losses() { grep -o '"loss":[^,}]*' "$1/metrics.jsonl"; }
training_runs() {
  rm -rf det-a det-b det-c
  echo "=== samba-micro, 100 steps, twice"
  micro det-a --steps 100 > train-det-a.log 2>&1 && micro det-b --steps 100 > train-det-b.log 2>&1
  if [ "$(losses det-a | wc -l)" = 100 ] && cmp -s <(losses det-a) <(losses det-b); then
    note "repeat: two runs of 100 steps, losses bit-identical ($(losses det-a | tail -1))"
  else
    note "repeat: FAIL (losses differ or a run failed: see train-det-*.log)"
  fi
  echo "=== samba-micro, killed with SIGKILL mid-run, resumed"
  # exec: $! is weft-run itself, which the kill must reach.
  (exec "${MICRO[@]}" det-c --steps 100 --checkpoint-every 10 > train-det-c.log 2>&1) &
  pid=$!
  until [ "$(wc -l < det-c/metrics.jsonl 2>/dev/null || echo 0)" -ge 35 ] || ! kill -0 $pid 2>/dev/null; do sleep 0.002; done
  kill -9 $pid 2>/dev/null
  wait $pid 2>/dev/null
  at=$(wc -l < det-c/metrics.jsonl)
  ckpt=$(cat det-c/latest 2>/dev/null)
  micro det-c --steps 100 --checkpoint-every 10 >> train-det-c.log 2>&1
  if [ "$at" -lt 100 ] && cmp -s <(losses det-a) <(losses det-c); then
    note "kill: SIGKILL after step $at (newest checkpoint $ckpt), resumed: losses equal the uninterrupted run's"
  else
    note "kill: FAIL (killed after step $at; losses differ from the uninterrupted run or the resume failed)"
  fi
  echo "=== samba-micro on to 300 steps (resumes det-a)"
  if micro det-a --steps 300 --checkpoint-every 100 | tee train-micro.log; then
    note "train samba-micro: $(tail -1 train-micro.log)"
    # The run directory with its newest checkpoint (for `weft generate --run` elsewhere).
    [ -n "${OUT:-}" ] && tar czf "$OUT/run-micro.tar.gz" det-a/run.json det-a/tokenizer.json det-a/latest \
      det-a/metrics.jsonl det-a/loss.svg "det-a/$(cat det-a/latest)"
    # Greedy generation from the GPU-trained run, on the GPU and on the CPU reference.
    for be in gpu cpu; do
      ./weft-run generate samba-micro-train.bundle --run det-a --prompt "Call me Ishmael." --max-new-tokens 60 \
        --temperature 0 --backend $be > gen-$be.log 2>&1 || echo "FAIL" >> gen-$be.log
      echo "--- generate on $be"; cat gen-$be.log
    done
    same=$(cmp -s <(head -1 gen-gpu.log) <(head -1 gen-cpu.log) && echo "the same text" || echo "texts differ")
    note "generate samba-micro (greedy, 60 tokens): $(tail -1 gen-gpu.log); CPU reference gives $same"
  else
    note "train samba-micro: FAIL"
  fi
}
# RUNS=1 runs them first; RUNS=side runs them beside the checks (their timings then mean little).
case "${RUNS:-1}" in
  0) ;;
  side) ( summary=(); training_runs; printf '%s\n' "${summary[@]}" > runs.result ) & side=$! ;;
  *) late "training runs" || training_runs ;;
esac

# ---- the engine and the server: prompts of different lengths decoded together, then HTTP ----
# micro-serve is samba-micro after 40 CPU steps (prepare.sh), four sequences per decode step.
ENGINE=${ENGINE:-1}
PROMPTS=("Call me Ishmael." "It was the best of times" "The whale"
  "Some years ago, never mind how long precisely, having little or no money in my purse, and nothing particular to interest me on shore,"
  "Queequeg" "I stuffed a shirt or two into my old carpet-bag, tucked it under my arm, and started for")
gen() { ./weft-run generate micro-serve.bundle --run micro-serve-run --max-new-tokens 48 --temperature 0 "$@"; }
same_texts() { python3 -c 'import json,sys; a,b=[[json.loads(l)["text"] for l in open(f)] for f in sys.argv[1:]]; print(sum(x==y for x,y in zip(a,b)) if len(a)==len(b) else -1)' "$1" "$2"; }
engine_runs() {
  printf '%s\n' "${PROMPTS[@]}" > prompts.txt
  echo "=== engine: ${#PROMPTS[@]} prompts, 4 slots"
  for be in gpu cpu; do
    gen --prompts prompts.txt --backend $be > engine-$be.jsonl 2> engine-$be.log || echo "FAIL" >> engine-$be.log
    cat engine-$be.log engine-$be.jsonl
  done
  : > engine-alone.jsonl
  for p in "${PROMPTS[@]}"; do printf '%s\n' "$p" | gen --prompts - --backend gpu >> engine-alone.jsonl 2>> engine-alone.log; done
  local n=${#PROMPTS[@]}
  note "engine (GPU, 4 slots, ${#PROMPTS[@]} prompts): $(same_texts engine-gpu.jsonl engine-alone.jsonl)/$n texts equal each prompt alone; $(same_texts engine-gpu.jsonl engine-cpu.jsonl)/$n equal the CPU reference's; $(grep -o '[0-9.]* s on [a-z0-9-]*' engine-gpu.log)"
  echo "=== serve on the GPU"
  ./weft-run serve micro-serve.bundle --run micro-serve-run --port 8321 --backend gpu > serve.log 2>&1 &
  local spid=$! up=0
  for _ in $(seq 300); do
    if python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:8321/health", timeout=1)' 2>/dev/null; then up=1; break; fi
    kill -0 $spid 2>/dev/null || break
    sleep 0.2
  done
  if [ $up = 1 ]; then
    PYTHONPATH=${WHEELS:-} python3 serve_check.py http://127.0.0.1:8321 engine-gpu.jsonl 48 2>&1 | tee serve-check.log
    kill -INT $spid; wait $spid; local rc=$?
    note "serve (GPU): $(grep -c ': ok:' serve-check.log) checks ok, $(grep -c ': FAIL:' serve-check.log) failed; SIGINT -> exit $rc"
    mapfile -t bad < <(grep ': FAIL:' serve-check.log)
    for l in "${bad[@]}"; do note "  $l"; done
  else
    kill $spid 2>/dev/null
    note "serve (GPU): FAIL (never answered /health; see serve.log)"
  fi
  cat serve.log
}
if [ "$ENGINE" = 1 ]; then late "engine" || engine_runs; fi

# ---- the check: every step against f64 and a bf16-rounding CPU run, then the whole model ----
# Decode runs far past each window and past full attention's prompt where the case is about it
# (full attention's decode on the CPU reference copies its cache every step: kept shorter).
declare -A flags=(
  [samba-micro]="--prompt 300 --decode-steps 790"
  [llama-tiny]="--prompt 300 --decode-steps 250"
  [gqa-tiny]="--prompt 24 --decode-steps 400"
  [odd-width]="--prompt 300 --decode-steps 500"
  [wide-heads]="--prompt 200 --decode-steps 400"
  [samba-421m-check]="--steps-only --prompt 24"
)
# CHECK_ALONE runs first, one at a time with every core (Samba-421M's CPU reference at 2100
# tokens in f32 and f64 takes minutes; beside other lanes it took over 300 s). Lanes (separated
# by ";") of CHECK then run side by side: the CPU reference is most of their time and the
# machine has cores to spare; the benchmarks below run alone.
CHECK_ALONE=${CHECK_ALONE:-samba-421m-check}
[ "$CHECK_ALONE" = none ] && CHECK_ALONE=
CHECK=${CHECK:-samba-tiny samba-micro llama-tiny mistral-tiny mamba-tiny gqa-tiny; mamba-swa-mlp-tiny mlp2-swa-mlp-tiny samba-nope-tiny; mamba-mlp-tiny odd-width wide-heads}
[ "$CHECK" = none ] && CHECK=
check_one() {
  local b=$1 t0=$SECONDS r
  if [ "$SECONDS" -ge "$DEADLINE" ]; then echo "check $b: skipped (out of time at ${SECONDS} s)" > "check-$b.result"; return; fi
  if timeout "${CHECK_TIMEOUT:-240}" ./weft-run check "$b.bundle" ${flags[$b]:-} > "check-$b.log" 2>&1; then r=pass; else r=FAIL; fi
  worst=$(awk '/ ok$| FAIL$/ { m = $(NF-1); if (m + 0 > w + 0) { w = m } } END { printf "%s", w }' "check-$b.log")
  echo "check $b: $r (worst margin $worst, $((SECONDS - t0)) s)" > "check-$b.result"
}
for b in $CHECK_ALONE; do
  CHECK_TIMEOUT=${ALONE_TIMEOUT:-480} check_one "$b"
  echo "=== check $b ${flags[$b]:-}"
  tail -n 60 "check-$b.log" 2>/dev/null
  note "$(cat "check-$b.result" 2>/dev/null || echo "check $b: no result")"
done
IFS=';' read -ra lanes <<< "$CHECK"
for lane in "${lanes[@]}"; do
  ( for b in $lane; do check_one "$b"; done ) &
done
wait
for lane in "${lanes[@]}"; do
  for b in $lane; do
    echo "=== check $b ${flags[$b]:-}"
    tail -n 60 "check-$b.log" 2>/dev/null
    note "$(cat "check-$b.result" 2>/dev/null || echo "check $b: no result")"
  done
done

if [ -n "${side:-}" ]; then
  wait "$side"
  while IFS= read -r line; do note "$line"; done < runs.result
fi

# ---- benchmarks: this tree against the baseline's, alternating, in this call ----
BENCH=${BENCH:-samba-421m samba-1.3b}
[ "$BENCH" = none ] && BENCH=
for b in $BENCH; do
  late "bench $b" && continue
  rounds=1
  [ "$b" = samba-421m ] && [ -x baseline/weft-run ] && rounds=2
  for r in $(seq $rounds); do
    echo "=== bench $b (round $r)"
    ./weft-run bench "$b.bundle" --steps 10 | tee -a "bench-$b.log"
    if [ "$b" = samba-421m ] && [ -x baseline/weft-run ]; then
      echo "=== bench $b, baseline $(cat baseline/commit) (round $r)"
      baseline/weft-run bench baseline/samba-421m.bundle --steps 10 | tee -a bench-baseline.log
    fi
  done
  ms=$(grep -o 'training step [0-9.]* ms' "bench-$b.log" | awk '{print $3}' | sort -n | head -1)
  line="bench $b: step $ms ms, $(grep -o 'MFU [0-9.]*%' "bench-$b.log" | head -1)"
  if [ "$b" = samba-421m ] && [ -s bench-baseline.log ]; then
    base=$(grep -o 'training step [0-9.]* ms' bench-baseline.log | awk '{print $3}' | sort -n | head -1)
    line="$line; baseline $(cat baseline/commit) $base ms: ratio $(awk -v a="$ms" -v b="$base" 'BEGIN { printf "%.4f", a / b }')"
  fi
  note "$line"
done

# ---- generation: decode steps with the states on the device against through the host ----
DECODE=${DECODE:-samba-421m samba-421m-b256}
[ "$DECODE" = none ] && DECODE=
for b in $DECODE; do
  late "decode $b" && continue
  echo "=== decode bench $b"
  if ./weft-run bench "$b.bundle" --decode --steps 300 2>&1 | tee "decode-$b.log"; then
    note "decode $b: $(grep -o 'states on the device.*' "decode-$b.log" | tr -s ' '); $(grep -o 'states through host.*' "decode-$b.log" | tr -s ' '); $(grep -o 'speed-up.*' "decode-$b.log")"
    note "start-up $b: $(grep -o 'start-up:.*' "decode-$b.log" | cut -d' ' -f2-)"
    note "decode $b by batch: $(grep -o 'B = .*tokens/s' "decode-$b.log" | tr -s ' ' | paste -sd';')"
    note "decode $b far into the context: $(grep -o 'position .*GiB' "decode-$b.log" | tr -s ' ' | paste -sd';')"
    note "chunked prefill $b: $(grep -o 'prompts of .*tokens/s' "decode-$b.log" | tr -s ' ' | paste -sd';')"
  else
    note "decode $b: FAIL (see decode-$b.log)"
  fi
done

# ---- start-up: launching weft-run generate on a Samba-421M run to its first token ----
if [[ " $DECODE " == *" samba-421m "* ]] && ! late "start-up of generate"; then
  rm -rf r421
  if ./weft-run train samba-421m.bundle --train sotu-valid.tokens --valid sotu-valid.tokens --tokenizer tokenizer-sotu.json \
      --steps 1 --eval-every 0 --eval-batches 1 --out r421 > r421-train.log 2>&1; then
    ./weft-run generate samba-421m.bundle --run r421 --prompt "The state of the Union" --max-new-tokens 8 > r421-gen.log 2>&1
    note "generate samba-421m: $(grep -o 'start-up:.*' r421-gen.log || echo FAIL: see r421-gen.log)"
  else
    note "generate samba-421m: training a 1-step run FAILED (see r421-train.log)"
  fi
fi

# ---- serving under load: random weights, 512-token prompts, 256 new tokens (ignore_eos) ----
# The same bundle's decode benchmark at its batch (64) comes first: the served throughput at
# 64 clients is compared with it.
LOAD=${LOAD:-serve-421m}
[ "$LOAD" = none ] && LOAD=
gpu_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }
for b in $LOAD; do
  late "load $b" && continue
  echo "=== decode bench $b"
  ./weft-run bench "$b.bundle" --decode --steps 100 2>&1 | tee "decode-$b.log"
  bench=$(grep -o 'states on the device *[0-9.]* ms/step *[0-9]* tokens/s' "decode-$b.log" | awk '{print $(NF-1)}')
  note "decode $b (bench, full batch): $(grep -o 'states on the device.*' "decode-$b.log" | tr -s ' ')"
  ./weft-run serve "$b.bundle" --random-weights 0 --tokenizer tokenizer.json --port 8322 --queue 4096 --backend gpu > "serve-$b.log" 2>&1 &
  spid=$!
  up=0
  for _ in $(seq 600); do
    if python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:8322/health", timeout=1)' 2>/dev/null; then up=1; break; fi
    kill -0 $spid 2>/dev/null || break
    sleep 0.2
  done
  if [ $up = 0 ]; then note "load $b: FAIL (the server did not come up; see serve-$b.log)"; kill $spid 2>/dev/null; cat "serve-$b.log"; continue; fi
  for c in ${LOAD_CLIENTS:-1 16 64}; do
    late "load $b at $c clients" && continue
    n=$(( c < 4 ? 4 : 2 * c ))
    echo "=== load $b: $c clients, $n requests"
    ./weft-run load --url http://127.0.0.1:8322 --clients $c --requests $n --prompt-tokens 512 --output-tokens 256 | tee "load-$b-$c.log"
    tps=$(grep -o '[0-9]* output tokens/s' "load-$b-$c.log" | awk '{print $1}')
    ratio=$(awk -v a="$tps" -v b="$bench" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "?" }')
    note "load $b, $c clients: $(head -1 "load-$b-$c.log" | grep -o '([0-9]* failed)'), $tps output tokens/s (${ratio}x the bench at full batch); ITL $(grep '^ITL' "load-$b-$c.log" | tr -s ' ' | cut -d' ' -f2-); TTFT $(grep '^TTFT' "load-$b-$c.log" | tr -s ' ' | cut -d' ' -f2-); GPU memory $(gpu_mib) MiB"
  done
  if ! late "load $b with a long prompt"; then
    echo "=== load $b: 16 clients and one 1000-token prompt"
    ./weft-run load --url http://127.0.0.1:8322 --clients 16 --requests 32 --prompt-tokens 512 --output-tokens 256 --long-prompt 1000 | tee "load-$b-long.log"
    note "load $b, 16 clients + one 1000-token prompt: ITL $(grep '^ITL' "load-$b-long.log" | tr -s ' ' | cut -d' ' -f2-); $(grep -o 'long prompt:.*' "load-$b-long.log")"
  fi
  kill -INT $spid; wait $spid
  note "serve $b: SIGINT -> exit $?; $(grep -c . "serve-$b.log") lines of log"
done

# ---- data-parallel training through NCCL ----
# One GPU accumulating both micro-batches of a step against NCCL ranks taking one each: a world
# of one (the same code path on one GPU), and two ranks where the machine has two GPUs.
DP=${DP:-1}
if [ "$DP" != 0 ] && ! late "data-parallel"; then
  ngpu=$(nvidia-smi -L | wc -l)
  DPT=(./weft-run train dp-samba-tiny.bundle --train sotu-train.tokens --valid sotu-valid.tokens --tokenizer tokenizer-sotu.json
    --steps "${DP_STEPS:-30}" --log-every 10 --eval-every 0)
  rm -rf dp-one dp-nccl1 dp-nccl2
  echo "=== data-parallel: one process accumulating 2 micro-batches, then NCCL ranks"
  "${DPT[@]}" --out dp-one 2>&1 | tee dp-one.log
  "${DPT[@]}" --out dp-nccl1 --ranks 1 2>&1 | tee dp-nccl1.log
  tps() { grep -o 'final training loss.*' "$1" | grep -o '[0-9]* tokens/s'; }
  if [ "$(losses dp-one | wc -l)" -gt 0 ] && cmp -s <(losses dp-one) <(losses dp-nccl1); then
    note "dp: a world of one through NCCL: losses bit-identical to one process ($(losses dp-one | tail -1)); $(tps dp-one.log) vs $(tps dp-nccl1.log)"
  else
    note "dp: a world of one through NCCL: FAIL (see dp-one.log, dp-nccl1.log)"
  fi
  if [ "$ngpu" -ge 2 ]; then
    "${DPT[@]}" --out dp-nccl2 --ranks 2 2>&1 | tee dp-nccl2.log
    if cmp -s <(losses dp-one) <(losses dp-nccl2); then
      note "dp: 2 GPUs through NCCL: losses bit-identical to one accumulating 2; $(tps dp-nccl2.log) against $(tps dp-one.log)"
    else
      note "dp: 2 GPUs through NCCL: losses differ from one accumulating 2 (see dp-nccl2.log): $(losses dp-nccl2 | tail -1) vs $(losses dp-one | tail -1)"
    fi
    # The same as two processes, torchrun-style (the stand-in for two machines).
    rm -rf dp-proc
    for r in 1 0; do
      RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 "${DPT[@]}" --out dp-proc > dp-proc-$r.log 2>&1 &
    done
    wait
    if cmp -s <(losses dp-one) <(losses dp-proc); then
      note "dp: 2 processes (RANK/WORLD_SIZE/MASTER_ADDR), NCCL: losses bit-identical to one accumulating 2; $(tps dp-proc-0.log)"
    else
      note "dp: 2 processes: FAIL or losses differ (see dp-proc-*.log)"
    fi
  fi
fi

# ---- perplexity against context length (the paper's Table 3 at small scale) ----
# samba-tiny and llama-tiny trained at 512 tokens on the State of the Union addresses before
# 1991, scored on those from 1991 on (each length over the same tokens); then the GPU's
# numbers at 512 and 2K against the CPU reference's chunked scoring of the same windows.
PPL=${PPL:-samba-tiny llama-tiny mistral-tiny}
[ "$PPL" = none ] && PPL=
ppl_row() { awk -v l="$2" '$1 == l { printf "%s", $4 }' "$1"; }
for s in $PPL; do
  late "ppl $s" && continue
  echo "=== train $s at 512 tokens, ${PPL_STEPS:-1000} steps"
  rm -rf "ppl-$s"
  if ! ./weft-run train "ppl-$s.bundle" --train sotu-train.tokens --valid sotu-valid.tokens --tokenizer tokenizer-sotu.json \
      --steps "${PPL_STEPS:-1000}" --log-every 100 --eval-every 250 --out "ppl-$s" > "ppl-train-$s.log" 2>&1; then
    tail -20 "ppl-train-$s.log"; note "ppl $s: training FAIL"; continue
  fi
  tail -6 "ppl-train-$s.log"
  note "ppl $s: ${PPL_STEPS:-1000} steps at 512 tokens: $(grep -o 'final training loss.*' "ppl-train-$s.log" | tail -1)"
  echo "=== perplexity of $s on the held-out addresses, GPU"
  ./weft-run eval ppl "ppl-$s.bundle" --run "ppl-$s" --data sotu-held-out --lengths "${PPL_LENGTHS:-512,2k,8k,32k}" \
    --windows 8 --svg "${OUT:-.}/ppl-$s.svg" > "ppl-$s.log" 2>&1
  cat "ppl-$s.log"
  note "ppl $s (GPU, 8 windows of the longest): $(awk 'NR > 1 && $2 ~ /^[0-9]+$/ { printf "%s: %s  ", $1, $4 }' "ppl-$s.log")$(grep -o 'evaluated in.*' "ppl-$s.log")"
  echo "=== the GPU against the CPU reference, 2 windows of 2K"
  for be in gpu cpu; do
    ./weft-run eval ppl "ppl-$s.bundle" --run "ppl-$s" --data sotu-held-out --lengths 512,2k --windows 2 --backend $be > "ppl-$s-$be.log" 2>&1
    cat "ppl-$s-$be.log"
  done
  note "ppl $s at 512 / 2K: GPU $(ppl_row ppl-$s-gpu.log 512) / $(ppl_row ppl-$s-gpu.log 2048), CPU reference $(ppl_row ppl-$s-cpu.log 512) / $(ppl_row ppl-$s-cpu.log 2048)"
  # Self-Extend (W=128, G=8: reach 3200 at 512) on full attention, on this machine's CPUs (the
  # GPU has no kernel for it yet).
  case " ${PPL_SELF_EXTEND:-llama-tiny} " in *" $s "*)
    late "ppl $s self-extend" && continue
    echo "=== perplexity of $s with Self-Extend 128,8, CPU reference"
    ./weft-run eval ppl "ppl-$s.bundle" --run "ppl-$s" --data sotu-held-out --lengths 512,2k,8k --windows 2 \
      --self-extend 128,8 --backend cpu > "ppl-$s-se.log" 2>&1
    cat "ppl-$s-se.log"
    note "ppl $s with Self-Extend 128,8 (CPU, 2 windows of 8K): $(awk 'NR > 1 && $2 ~ /^[0-9]+$/ { printf "%s: %s  ", $1, $4 }' "ppl-$s-se.log")"
  esac
done

# ---- passkey retrieval after tuning (appendix B at small scale) ----
# A model of the perplexity runs tuned on generated passkey examples of 512 tokens (the loss on
# the answer alone), then asked at 512 to 8K tokens, 11 depths x 5 keys of another seed.
PASSKEY=${PASSKEY:-samba-tiny mistral-tiny}
[ "$PASSKEY" = none ] && PASSKEY=
for s in $PASSKEY; do
  late "passkey $s" && continue
  [ -d "ppl-$s" ] || { note "passkey $s: no ppl-$s run to tune"; continue; }
  echo "=== passkey tuning of $s, ${PASSKEY_STEPS:-300} steps"
  rm -rf "pk-$s"
  if ! ./weft-run train "ppl-$s.bundle" --passkey 4000 --init-from "ppl-$s" --tokenizer tokenizer-sotu.json \
      --steps "${PASSKEY_STEPS:-300}" --log-every 25 --eval-every 50 --out "pk-$s" > "pk-train-$s.log" 2>&1; then
    tail -20 "pk-train-$s.log"; note "passkey $s: tuning FAIL"; continue
  fi
  grep -o '"step":[0-9]*,"loss":[0-9.]*' "pk-$s/metrics.jsonl" | tr '\n' ' '; echo
  note "passkey $s: tuned ${PASSKEY_STEPS:-300} steps: $(grep -o 'final training loss.*' "pk-train-$s.log" | tail -1)"
  ./weft-run eval passkey "ppl-$s.bundle" --run "pk-$s" --lengths "${PASSKEY_LENGTHS:-512,2k,8k}" --depths 11 --keys 5 \
    --svg "${OUT:-.}/passkey-$s.svg" > "pk-$s.log" 2>&1
  cat "pk-$s.log"
  note "passkey $s (GPU, 11 depths x 5 keys): $(awk 'NR > 1 && NF > 2 { printf "%s: %s  ", $1, $NF }' "pk-$s.log")$(grep -o 'evaluated in.*' "pk-$s.log")"
done

echo "=== summary"
printf '%s\n' "${summary[@]}" | tee summary.log
if [ -n "${OUT:-}" ]; then tar czf "$OUT/logs.tar.gz" *.log; fi
