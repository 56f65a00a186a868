#!/usr/bin/env bash
# The paper-scale acceptance runs on qwen2.5-coder-0.5b-instruct (chat format, all 336 heads, all 100
# prompts of JailbreakBench and MaliciousInstruct), each step timed into $RUNS/times.txt:
#   1. ships + Generalized Ships from the same sweep (`ships --with-gships`), 2 datasets x 2 methods;
#   2. sahara --group-size 3 (JailbreakBench, each method, candidates: the top 20 of step 1);
#   3. the figure (docs-style PNG);
#   4. evaluate: baseline and the top-1 / top-3 Generalized Ships heads of each method (from the
#      JailbreakBench runs), greedy, 64 new tokens, both datasets, helpfulness on the harmless set;
#   5. the HTML report of everything in $RUNS.
# and, as STEPS=dose (issue 16's dose-response experiment, not in the default STEPS):
#   6. held-out rankings on the first $DOSE_LIMIT (default 50) AdvBench prompts: ships --with-gships
#      for each method (Generalized Ships of both methods, Ships of undifferentiated) and the refusal
#      score (undifferentiated);
#   7. evaluate on all of JailbreakBench and MaliciousInstruct (prompts the rankings never saw):
#      baseline, the top 1/3/10 of every ranking, and random heads (K = 1, 3, 10; 3 draws each, seed 0)
#      under each method (scaling: K = $DOSE_RANDOM_SCALING), greedy, 64 new tokens; asr.csv with Wilson intervals and McNemar p-values,
#      found_vs_random.csv, dose_response.png/.svg; one folder per method (dose/evaluate-undifferentiated,
#      dose/evaluate-scaling). The 2026-12-02 run: DOSE_LIMIT=10 DOSE_RANDOM_SCALING=3,10 (time).
#
#   scripts/acceptance.sh                       # .venv/bin/safetyheads, runs/acceptance/, any device
#   LIMIT=8 RUNS=/tmp/acc scripts/acceptance.sh # a quick smoke run on the first 8 prompts (and 8 harmless)
#   MODEL=smollm2-135m-instruct LIMIT=2 RUNS=/tmp/acc scripts/acceptance.sh   # smoke test, minutes on a CPU
#   STEPS="scores sahara" scripts/acceptance.sh # only some steps
#
# Resumable: rerun after an interruption and every finished chunk is kept (each command gets --resume
# once its folder exists); finished steps are skipped. On a 2-core CPU step 1 takes about an hour per dataset and method; on one
# GPU minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
SH=${SH:-.venv/bin/safetyheads}
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct}
RUNS=${RUNS:-runs/acceptance}
STEPS=${STEPS:-scores sahara figure evaluate}
LIMIT_ARGS=(); EVAL_LIMIT_ARGS=()
if [[ -n "${LIMIT:-}" ]]; then LIMIT_ARGS=(--limit "$LIMIT"); EVAL_LIMIT_ARGS=(--harmless-limit "$LIMIT"); fi
if [[ -z "${SAFETYHEADS_DATA_DIR:-}" && -d ../shared/datasets ]]; then export SAFETYHEADS_DATA_DIR="$PWD/../shared/datasets"; fi
mkdir -p "$RUNS"

step() {  # step NAME FOLDER COMMAND...: run it (with --resume when FOLDER exists), log its wall time
  local name=$1 folder=$2; shift 2
  if [[ -f "$folder/manifest.json" ]] && grep -q '"finished"' "$folder/manifest.json"; then
    echo "$name: finished already in $folder (delete the folder to redo it)"; return
  fi
  local resume=(); if [[ -f "$folder/manifest.json" ]]; then resume=(--resume); fi
  local start; start=$(date +%s)
  "$@" "${resume[@]}" --out "$folder"
  echo "$name $(( $(date +%s) - start ))s" | tee -a "$RUNS/times.txt"
}

has() { [[ " $STEPS " == *" $1 "* ]]; }
COMMON=(--model "$MODEL" --format chat "${LIMIT_ARGS[@]}")
if has scores; then
  for dataset in jailbreakbench maliciousinstruct; do
    for method in undifferentiated scaling; do
      step "ships+gships $dataset $method" "$RUNS/ships-$dataset-$method" \
        "$SH" ships "${COMMON[@]}" --dataset "$dataset" --method "$method" --with-gships
    done
  done
fi
if has sahara; then
  for method in undifferentiated scaling; do
    step "sahara jailbreakbench $method" "$RUNS/sahara-jailbreakbench-$method" \
      "$SH" sahara "${COMMON[@]}" --dataset jailbreakbench --method "$method" --group-size 3 \
      --candidates top20 --gships-from "$RUNS/ships-jailbreakbench-$method"
  done
fi
if has figure; then
  "$SH" figure "$RUNS"/ships-* --out "$RUNS/figure.png" --formats png,svg
fi
if has dose; then
  DOSE_SET=${DOSE_SET:-advbench}; DOSE_LIMIT=${DOSE_LIMIT:-${LIMIT:-50}}
  DOSE=(--model "$MODEL" --format chat --dataset "$DOSE_SET" --limit "$DOSE_LIMIT")
  D=$RUNS/dose
  EVAL=("$SH" evaluate "${COMMON[@]}" --dataset jailbreakbench --dataset maliciousinstruct
        --top 1,3,10 --repeats 3 --seed 0 --max-new-tokens 64 --greedy --batch-size 50 --no-helpfulness)
  # one evaluation per method, undifferentiated first (a complete result before scaling starts); the
  # scaling one reuses its baseline answers
  step "dose: ships+gships $DOSE_SET undifferentiated" "$D/ships-$DOSE_SET-undifferentiated" \
    "$SH" ships "${DOSE[@]}" --method undifferentiated --with-gships
  step "dose: refusal $DOSE_SET undifferentiated" "$D/refusal-$DOSE_SET-undifferentiated" \
    "$SH" refusal "${DOSE[@]}" --method undifferentiated
  step "dose: evaluate undifferentiated" "$D/evaluate-undifferentiated" "${EVAL[@]}" --method undifferentiated \
    --random 1,3,10 --from "$D/ships-$DOSE_SET-undifferentiated" \
    --from "$D/ships-$DOSE_SET-undifferentiated/ships_summary.csv" --from "$D/refusal-$DOSE_SET-undifferentiated"
  step "dose: ships+gships $DOSE_SET scaling" "$D/ships-$DOSE_SET-scaling" \
    "$SH" ships "${DOSE[@]}" --method scaling --with-gships
  step "dose: evaluate scaling" "$D/evaluate-scaling" "${EVAL[@]}" --method scaling \
    --random "${DOSE_RANDOM_SCALING:-1,3,10}" --from "$D/ships-$DOSE_SET-scaling" --reuse "$D/evaluate-undifferentiated"
fi
if has evaluate; then
  step "evaluate" "$RUNS/evaluate" \
    "$SH" evaluate "${COMMON[@]}" --dataset jailbreakbench --dataset maliciousinstruct \
    --from "$RUNS/ships-jailbreakbench-undifferentiated" --from "$RUNS/ships-jailbreakbench-scaling" \
    --top 1,3 --method undifferentiated,scaling --max-new-tokens 64 --greedy --batch-size 50 "${EVAL_LIMIT_ARGS[@]}"
fi
"$SH" report "$RUNS" --out "$RUNS/report.html"  # every run folder found under $RUNS
