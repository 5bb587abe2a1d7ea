#!/usr/bin/env bash
# Which method stops the hack (RESULTS.md): gold against KL for each method, swept over its own KL
# coefficient, from one finished seed of ./pipeline.sh on the built-in task. Every run is the
# pipeline's own command for its stage (budgets, seed) with only the method's flags and coefficient
# changed; a run the pipeline or study/study.sh already made with the same flags is reused.
#
#   ./pipeline.sh --seed 3 && study/frontier.sh --pipeline runs/pipeline-s3      # into runs/pipeline-s3/frontier
#   python study/frontier.py report runs/pipeline-s*/frontier/measured/*/measured.json --out runs/frontier
#   python study/frontier.py verdict runs/pipeline-s*/frontier/measured/*/measured.json
#
# Methods (η: the KL coefficient of every PPO-family run; β: DPO's): PPO w/ KL, GI-PPO (the paper's
# groups, the pipeline's β_policy), PPO with the reward-rank KL, RLOO (--rloo_k samples per prompt, no
# critic), UWO and WCO (an ensemble of the pipeline's RM and --members more, trained with other seeds),
# PAR, DPO and GR-DPO. Then each model's KL from π^SFT and gold (study/frontier.py measure). --jobs runs
# that many stages side by side (each one thread: OMP_NUM_THREADS=1 is set for them).
set -euo pipefail
cd "$(dirname "$0")/.."
source plumbing/stages.sh

flag pipeline runs/pipeline-s1 "a finished ./pipeline.sh run on the built-in task"
flag etas "0 0.01 0.1 0.5 1" "η of every PPO-family method (0: no KL penalty)"
flag dpo_betas "0.03 0.1 0.3 1" "β of DPO and GR-DPO"
flag members 3 "reward models the ensembles add to the pipeline's (each from another seed)"
flag uwo_lambda 0.5 "UWO's λ"
flag rloo_k 4 "RLOO: samples per prompt"
flag methods "ppo_kl gi_ppo rank_kl rloo uwo wco par dpo gr_dpo" "the methods to run"
flag jobs 2 "stages side by side"
flag python python "the Python interpreter"
switch force "rerun stages whose outputs exist"
parse_flags "$@"
export OMP_NUM_THREADS=1
PY="$PYTHON" OUT="$PIPELINE/frontier" STAGE_ROOT="$PIPELINE"
for name in sft reward ppo gi_ppo ppo_kl dpo; do stage_args "$PIPELINE/$name" > /dev/null; done  # each a finished pipeline stage
mapfile -t GI < <(stage_args "$PIPELINE/gi_ppo")
mapfile -t KL < <(stage_args "$PIPELINE/ppo_kl")
mapfile -t DPO < <(stage_args "$PIPELINE/dpo")
mapfile -t RM < <(stage_args "$PIPELINE/reward")
SEED=$(flag_of "$PIPELINE/reward" seed)

pool() {  # pool COMMAND...: each command in a subshell, --jobs at a time (the next starts as one ends)
  local line running=0 failed=0
  for line in "$@"; do
    if [ "$running" -ge "$JOBS" ]; then wait -n || failed=1; running=$((running - 1)); fi
    ( eval "$line" ) &
    running=$((running + 1))
  done
  while [ "$running" -gt 0 ]; do wait -n || failed=1; running=$((running - 1)); done
  if [ "$failed" = 1 ]; then echo "frontier.sh: a stage failed (above)" >&2; exit 1; fi
}

member() { stage "ensemble member $1" "$OUT/rm_seed$1/config.json" "$PY" "${RM[@]}" --seed "$1" --out "$OUT/rm_seed$1"; }
MEMBER_SEEDS=() ENSEMBLE=()
for ((m = 1; m <= MEMBERS; m++)); do MEMBER_SEEDS+=("$((SEED + 100 * m))") ENSEMBLE+=("$OUT/rm_seed$((SEED + 100 * m))"); done

run_dir() {  # run_dir METHOD COEF: the folder of that run (a reused one where the flags are the same)
  case "$1@$2" in
    "ppo_kl@$(flag_of "$PIPELINE/ppo_kl" kl_coef)") echo "$PIPELINE/ppo_kl" ;;
    "ppo_kl@$(flag_of "$PIPELINE/ppo" kl_coef)"|"rank_kl@$(flag_of "$PIPELINE/ppo" kl_coef)") echo "$PIPELINE/ppo" ;;  # η 0: PPO, no KL
    "gi_ppo@$(flag_of "$PIPELINE/gi_ppo" kl_coef)") echo "$PIPELINE/gi_ppo" ;;
    "dpo@$(flag_of "$PIPELINE/dpo" beta)") echo "$PIPELINE/dpo" ;;
    "dpo@0.1") [ -z "$(flag_of "$PIPELINE/dpo" beta)" ] && echo "$PIPELINE/dpo" || echo "$OUT/dpo_$2" ;;  # dpo.py's default β
    "rank_kl@$(flag_of "$PIPELINE/ppo_kl" kl_coef)") [ -f "$PIPELINE/study/ppo_rank_kl/config.json" ] && echo "$PIPELINE/study/ppo_rank_kl" || echo "$OUT/$1_$2" ;;
    "gr_dpo@0.1") [ -f "$PIPELINE/study/gr_dpo/config.json" ] && [ -z "$(flag_of "$PIPELINE/study/gr_dpo" beta)" ] \
                    && echo "$PIPELINE/study/gr_dpo" || echo "$OUT/$1_$2" ;;  # the study's GR-DPO at dpo.py's default β
    *) echo "$OUT/$1_$2" ;;
  esac
}

train() {  # train METHOD COEF: one run of the sweep (skipped where run_dir is another stage's)
  local method="$1" coef="$2" dir; dir=$(run_dir "$1" "$2")
  [ "$dir" != "$OUT/${method}_$coef" ] && return
  local variant=(study/ppo_variants.py "${KL[@]:1}" --kl_coef "$coef")
  case "$method" in
    ppo_kl) variant=("${KL[@]}" --kl_coef "$coef") ;;
    gi_ppo) variant=("${GI[@]}" --kl_coef "$coef") ;;
    rank_kl) variant+=(--kl_weight rank) ;;
    rloo) variant+=(--estimator rloo --rloo_k "$RLOO_K") ;;
    uwo|wco) variant+=(--ensemble "$method" --members "${ENSEMBLE[@]}" --uwo_lambda "$UWO_LAMBDA") ;;
    par) variant+=(--par) ;;
    dpo) variant=("${DPO[@]}" --beta "$coef") ;;
    gr_dpo) variant=(study/gr_dpo.py "${DPO[@]:1}" --beta "$coef") ;;
  esac
  stage "$method η/β=$coef" "$dir/config.json" "$PY" "${variant[@]}" --out "$dir"
}

measure() {  # measure METHOD COEF: the run's KL and gold into OUT/measured/METHOD@COEF/measured.json
  stage "measure $1 η/β=$2" "$OUT/measured/$1@$2/measured.json" "$PY" study/frontier.py measure "$(run_dir "$1" "$2")" \
    --sft "$PIPELINE/sft" --seed "$SEED" --out "$OUT/measured/$1@$2/measured.json"
}

one_run() { train "$@"; measure "$@"; }  # one_run METHOD COEF
FIRST=() ENSEMBLED=()  # the ensemble's runs start once its members are trained; DPO's, the longest, first
for method in $(printf '%s\n' $METHODS | grep -E '^(gr_)?dpo$'; printf '%s\n' $METHODS | grep -vE '^(gr_)?dpo$'); do
  case "$method" in dpo|gr_dpo) coefs=$DPO_BETAS ;; *) coefs=$ETAS ;; esac
  for coef in $coefs; do
    case "$method" in uwo|wco) ENSEMBLED+=("one_run $method $coef") ;; *) FIRST+=("one_run $method $coef") ;; esac
  done
done
case " $METHODS " in *" uwo "*|*" wco "*) for s in "${MEMBER_SEEDS[@]}"; do FIRST=("member $s" "${FIRST[@]}"); done ;; esac
pool "${FIRST[@]}"
if [ "${#ENSEMBLED[@]}" -gt 0 ]; then pool "${ENSEMBLED[@]}"; fi
echo "== frontier: $OUT/measured; over seeds: python study/frontier.py report runs/pipeline-s*/frontier/measured/*/measured.json --out runs/frontier"
