#!/usr/bin/env bash
# What carries GI-PPO's effect (RESULTS.md, "What carries the effect"; docs/METHOD.md,
# "Variants for the study"), from one finished seed of ./pipeline.sh on the built-in task, whose SFT model, reward
# model and runs it reuses: every run here takes the pipeline's own command for its stage (its budgets
# and seed) and changes only what the row names.
#
#   ./pipeline.sh --seed 3 && study/study.sh --pipeline runs/pipeline-s3
#   python study/reports.py study runs/pipeline-s{1,2,3,4,5}/study/eval/results.json --out runs/study
#
# Rows: GI-PPO at each β_policy for three groupings (inferred from prompt and response, the paper's,
# `x,y`; inferred from the prompt, `x`; the data's true groups, `known`; the pipeline's gi_ppo and
# gi_beta0 are the paper's grouping at its β_policy and at 0), PPO w/ KL with η searched on the RL split
# until its KL over the last 10 iterations is within 10% of GI-PPO's (KL-matched), PPO with the
# reward-rank KL weight, GR-DPO, and the pipeline's PPO w/ KL, DPO and SFT; all judged by gold
# against the KL-matched run, into PIPELINE/study/.
set -euo pipefail
cd "$(dirname "$0")/.."
source plumbing/stages.sh

flag pipeline runs/pipeline-s1 "a finished ./pipeline.sh run on the built-in task"
flag betas "0 0.1 0.3 1 3 10" "the β_policy of each grouping's GI-PPO runs"
flag kl_match_tries 4 "PPO w/ KL runs at most in the search for the KL-matched η"
flag python python "the Python interpreter"
switch force "rerun stages whose outputs exist"
parse_flags "$@"
PY="$PYTHON" OUT="$PIPELINE/study" STAGE_ROOT="$PIPELINE"
for name in gi_ppo ppo_kl dpo eval; do stage_args "$PIPELINE/$name" > /dev/null; done  # each a finished pipeline stage
mapfile -t GI < <(stage_args "$PIPELINE/gi_ppo")  # the script and its flags, a line each
mapfile -t KL < <(stage_args "$PIPELINE/ppo_kl")
mapfile -t DPO < <(stage_args "$PIPELINE/dpo")
PIPELINE_BETA=$(flag_of "$PIPELINE/gi_ppo" beta_policy)

variant() {  # variant NAME TEMPLATE_ARRAY FLAGS...: the template's run with FLAGS (given last, they win), into OUT/NAME
  local name="$1"; local -n template="$2"; shift 2
  stage "$name" "$OUT/$name/config.json" "$PY" study/ppo_variants.py "${template[@]:1}" "$@" --out "$OUT/$name"
}

ROWS=()
for grouping in x,y x known; do
  case "$grouping" in x,y) flags=() ;; x) flags=(--group_input prompt) ;; known) flags=(--groups known) ;; esac
  for beta in $BETAS; do
    dir="$OUT/gi_${grouping/,/}_beta$beta"
    if [ "$grouping" = x,y ] && [ "$beta" = "$PIPELINE_BETA" ]; then dir="$PIPELINE/gi_ppo"  # the paper's grouping: the pipeline's runs
    elif [ "$grouping" = x,y ] && [ "$beta" = 0 ]; then dir="$PIPELINE/gi_beta0"
    else variant "gi_${grouping/,/}_beta$beta" GI --beta_policy "$beta" "${flags[@]}"; fi
    ROWS+=("GI ($grouping) β $beta=$dir")
  done
done
variant ppo_rank_kl KL --kl_weight rank
# KL-matched PPO w/ KL: η on the RL split, until its KL over the last 10 iterations is within 10% of GI-PPO's
CANDIDATES=("$PIPELINE/ppo_kl") MATCHED=""
for try in $(seq "$KL_MATCH_TRIES"); do
  read -r verdict value closest < <("$PY" study/reports.py match_kl "$PIPELINE/gi_ppo" "${CANDIDATES[@]}")
  if [ "$verdict" = match ]; then MATCHED="$value"; break; fi
  variant "ppo_kl_eta$value" KL --kl_coef "$value"
  CANDIDATES+=("$OUT/ppo_kl_eta$value")
done
if [ -z "$MATCHED" ]; then
  read -r verdict value closest < <("$PY" study/reports.py match_kl "$PIPELINE/gi_ppo" "${CANDIDATES[@]}")
  if [ "$verdict" = match ]; then MATCHED="$value"; else MATCHED="$closest"; fi
  echo "== KL-matched: no η within 10% of GI-PPO's KL in $KL_MATCH_TRIES tries; the closest: $MATCHED"
fi
echo "== KL-matched PPO w/ KL: $MATCHED"
stage gr_dpo "$OUT/gr_dpo/config.json" "$PY" study/gr_dpo.py "${DPO[@]:1}" --out "$OUT/gr_dpo"
stage "study evaluate" "$OUT/eval/results.json" "$PY" evaluate.py --model "PPO w/ KL (KL-matched)=$MATCHED" \
  --opponents "${ROWS[@]}" "PPO w/ KL=$PIPELINE/ppo_kl" "PPO (rank KL)=$OUT/ppo_rank_kl" "DPO=$PIPELINE/dpo" \
  "GR-DPO=$OUT/gr_dpo" "SFT=$PIPELINE/sft" --judges gold --splits test ood --n_prompts "$(flag_of "$PIPELINE/eval" n_prompts)" \
  --seed "$(flag_of "$PIPELINE/eval" seed)" --out "$OUT/eval"
echo "== study: results in $OUT/eval; over seeds: python study/reports.py study runs/pipeline-s*/study/eval/results.json --out runs/study"
