#!/usr/bin/env bash
# The measurement behind ppo_gi.py's step-size defaults (--lr, --minibatch): for 3 seeds, the
# pipeline's SFT (400 steps) and reward model (150 steps), then 40 PPO iterations of each variant
# below, side by side (sized for one GPU: 27 runs at once; on a 2-core CPU set SEEDS=1).
# The no-signal control (--shuffle_rewards) should leave greedy test gold where SFT has it, and
# PPO w/ KL should not end below SFT.
#
#   bash bench/ppo_defaults.sh                 # prints one line per seed and run; RESULTS.md has the table
#   SEEDS=1 RUNS=runs/ppo_defaults bash bench/ppo_defaults.sh
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
RUNS="${RUNS:-runs/ppo_defaults}"
PY="${PYTHON:-python3}"
mkdir -p "$RUNS"

seed_runs() {
  local s=$1 M="$RUNS/s$1"
  "$PY" sft.py --steps 400 --seed "$s" --out "$M/sft" --save_every 0 --gold_prompts 0 > "$M.sft.log" 2>&1 || { echo "sft seed $s failed"; return; }
  "$PY" reward.py --sft "$M/sft" --steps 150 --eval_every 150 --seed "$s" --out "$M/reward" --save_every 0 > "$M.rm.log" 2>&1 || { echo "reward seed $s failed"; return; }
  run() {  # run NAME FLAGS...
    local name=$1; shift
    "$PY" ppo_gi.py --sft "$M/sft" --reward "$M/reward" --steps 40 --seed "$s" --out "$M/$name" --save_every 0 \
      --eval_prompts 500 "$@" > "$M.$name.log" 2>&1 || echo "$name seed $s failed (see $M.$name.log)"
  }
  run sft_unchanged --no_gi --lr 0 --steps 1 &                                           # the SFT policy, not updated
  run shuffled_lr1e-4_mb16 --no_gi --shuffle_rewards --lr 1e-4 --minibatch 16 &
  run shuffled --no_gi --shuffle_rewards &                                        # the defaults from here on
  run ppo_kl_lr1e-4_mb16 --no_gi --lr 1e-4 --minibatch 16 &
  run ppo_kl --no_gi &
  run gi_ppo &
  run gi_ppo_beta2 --beta_policy 2 &
  run gi_ppo_slide --j_form slide --beta_policy 0.05 --kl_coef 1 &
  run ppo_gold --reward gold --no_gi &
  wait
}
for s in ${SEEDS:-1 2 3}; do seed_runs "$s" & done
wait
"$PY" - "$RUNS" <<'PY'
import glob, json, os, sys
runs = sys.argv[1]
print(f"{'seed/run':28s} {'test gold':>9s} {'Δ vs SFT':>9s} {'KL':>6s} {'grad_cos':>8s}")
for path in sorted(glob.glob(os.path.join(runs, "s*", "*", "metrics.jsonl"))):
    rows = [json.loads(line) for line in open(path)]
    name = os.path.relpath(os.path.dirname(path), runs)
    sft = os.path.join(runs, name.split("/")[0], "sft_unchanged", "metrics.jsonl")
    gold = [r["eval/gold_mean"] for r in rows if "eval/gold_mean" in r]
    base = [json.loads(line).get("eval/gold_mean") for line in open(sft)] if os.path.exists(sft) else []
    base = [b for b in base if b is not None]
    it = [r for r in rows if "objective/kl" in r][-10:]  # the last 10 iterations
    kl = sum(r["objective/kl"] for r in it) / len(it)
    cos = [r["groups/grad_cos"] for r in rows if "groups/grad_cos" in r]
    print(f"{name:28s} {gold[-1]:9.3f} {gold[-1] - base[-1]:+9.3f} {kl:6.2f} "
          + (f"{sum(cos) / len(cos):+8.2f}" if cos else f"{'':>8s}"))
PY
