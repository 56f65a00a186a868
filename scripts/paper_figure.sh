#!/usr/bin/env bash
# Regenerate the README figure (docs/figure.png + .svg) and its report from real runs:
# Generalized Ships of qwen2.5-coder-0.5b-instruct (chat format), all 100 prompts of JailbreakBench
# and MaliciousInstruct, both ablation methods (Undifferentiated Attention, Scaling Contribution).
#
#   scripts/paper_figure.sh            # uses .venv/bin/safetyheads, writes runs/paper/ and docs/figure.*
#   LIMIT=20 scripts/paper_figure.sh   # a quicker look on the first 20 prompts per dataset
#   MODEL=smollm2-135m-instruct EXTRA="--layers 0-3" OUT=/tmp/fig.png RUNS=/tmp/runs scripts/paper_figure.sh
#
# Resumable: an interrupted run continues where it stopped when the script is rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
SH=${SH:-.venv/bin/safetyheads}
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct}
RUNS=${RUNS:-runs/paper}
OUT=${OUT:-docs/figure.png}
LIMIT_ARGS=()
if [[ -n "${LIMIT:-}" ]]; then LIMIT_ARGS=(--limit "$LIMIT"); RUNS="$RUNS-limit$LIMIT"; fi
if [[ -z "${SAFETYHEADS_DATA_DIR:-}" && -d ../shared/datasets ]]; then export SAFETYHEADS_DATA_DIR="$PWD/../shared/datasets"; fi

for dataset in jailbreakbench maliciousinstruct; do
  for method in undifferentiated scaling; do
    run="$RUNS/gships-$dataset-$method"
    resume=(); if [[ -f "$run/manifest.json" ]]; then resume=(--resume); fi
    "$SH" gships --model "$MODEL" --dataset "$dataset" --format chat --method "$method" \
      "${LIMIT_ARGS[@]}" ${EXTRA:-} "${resume[@]}" --out "$run"
  done
done
"$SH" figure "$RUNS"/gships-* --out "$OUT" --formats png,svg
"$SH" report "$RUNS"/gships-* --out "$RUNS/report.html"
