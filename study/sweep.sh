#!/usr/bin/env bash
# The β_policy × η sweep that chose the pipeline's coefficients (RESULTS.md, "The β_policy × η sweep"),
# from one finished seed of ./pipeline.sh on the built-in task: GI-PPO at each β_policy × η and PPO w/ KL
# at each η, each the pipeline's own run with those coefficients, and the SFT policy run through the
# same iterations at lr 0 (the same prompts and sampling seeds, no update). Judged by the gold of the
# sampled responses to the RL split's prompts over the last 10 iterations: no test prompt is used.
#
#   ./pipeline.sh --seed 1 && study/sweep.sh --pipeline runs/pipeline-s1     # table in PIPELINE/sweep/sweep.md
set -euo pipefail
cd "$(dirname "$0")/.."
source plumbing/stages.sh

flag pipeline runs/pipeline-s1 "a finished ./pipeline.sh run on the built-in task"
flag etas "0.05 0.2 0.5" "η of every run"
flag betas "0.1 0.3 1" "β_policy of the GI-PPO runs"
switch no_reference "skip the lr 0 reference run"
flag python python "the Python interpreter"
switch force "rerun stages whose outputs exist"
parse_flags "$@"
PY="$PYTHON" OUT="$PIPELINE/sweep" STAGE_ROOT="$PIPELINE"
for name in gi_ppo ppo_kl; do stage_args "$PIPELINE/$name" > /dev/null; done  # each a finished pipeline stage
mapfile -t GI < <(stage_args "$PIPELINE/gi_ppo")
mapfile -t KL < <(stage_args "$PIPELINE/ppo_kl")

if [ "$NO_REFERENCE" = 0 ]; then
  stage "sweep reference: the SFT policy, not updated" "$OUT/sft_lr0/config.json" "$PY" "${KL[@]}" --lr 0 --out "$OUT/sft_lr0"
fi
for eta in $ETAS; do
  stage "sweep ppo_kl η=$eta" "$OUT/ppo_kl_eta$eta/config.json" "$PY" "${KL[@]}" --kl_coef "$eta" --out "$OUT/ppo_kl_eta$eta"
  for beta in $BETAS; do
    stage "sweep gi_ppo β_policy=$beta η=$eta" "$OUT/gi_beta${beta}_eta$eta/config.json" "$PY" "${GI[@]}" --beta_policy "$beta" \
      --kl_coef "$eta" --out "$OUT/gi_beta${beta}_eta$eta"
  done
done
RUNS=() && [ "$NO_REFERENCE" = 0 ] && RUNS+=("$OUT/sft_lr0")
for eta in $ETAS; do RUNS+=("$OUT/ppo_kl_eta$eta"); for beta in $BETAS; do RUNS+=("$OUT/gi_beta${beta}_eta$eta"); done; done
"$PY" study/reports.py runs "${RUNS[@]}" | tee "$OUT/sweep.md"  # a table of this sweep's runs, rewritten from their logs
