"""How far one PPO update moves the policy, per learning rate: the KL from π^SFT after each of a few
updates, and the KL a power law through them predicts after a run's full count (a measurement, not
a test). It sizes a preset's PPO lr before a long run: pipeline.sh --data hh --preset gpu runs 60
updates of 64 rollouts, and an lr at which 60 updates leave KL ≈ 0.01 compares nothing.

Each lr is one `python ppo_gi.py` run of UPDATES + 1 iterations from the same SFT model and reward
model (iteration k's rollout is sampled after k updates; its objective/kl is the KL logged), with the
preset's shapes by default: 64 prompts of the rl split, one minibatch of 64, 128 new tokens at
max_len 512, η 0.1, β_policy 0.1, critic lr 5e-6; --grad_accum 16 splits each update into micro-batches
to fit a CPU's memory (the same update: micro-batching is exact). The fit: log KL = a + b·log k over k = 1..UPDATES
(k1 KL below 1e-6 is floored there), then KL(N) = e^a·N^b, given only where the KL grew (b > 0); and
always the two ends a few noisy points leave open: the KL stays where the updates put it (the
mean over k), or it grows linearly (the mean of KL_k / k, times N).

    python bench/ppo_lr_probe.py --sft runs/pipeline-s1-hh-cpu/sft --reward runs/pipeline-s1-hh-cpu/reward \\
        --data ../shared/data/hh-rlhf --lrs 1e-6 1e-5 --updates 2 --out runs/lr_probe     # one JSON line per lr
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--sft", required=True, help="SFT model directory (policy and reference)")
parser.add_argument("--reward", required=True, help="reward model directory (and the critic's start)")
parser.add_argument("--data", required=True, help="data.py spec of the prompts (its rl split)")
parser.add_argument("--lrs", type=float, nargs="+", default=[1e-6, 1e-5], help="policy learning rates to probe")
parser.add_argument("--updates", type=int, default=2, help="updates measured per lr (the run has one more iteration)")
parser.add_argument("--full", type=int, default=60, help="the run length to predict the KL of (updates)")
parser.add_argument("--out", required=True, help="a new folder: one ppo_gi.py run per lr inside it")
parser.add_argument("--flags", default="--rollout_batch 64 --batch_size 64 --max_new_tokens 128 --max_len 512 --kl_coef 0.1 "
                    "--beta_policy 0.1 --critic_lr 5e-6 --group_by harm --forward_batch 16 --grad_accum 16",
                    help="ppo_gi.py's other flags (default: pipeline.sh's GPU preset)")


def fit(kls, full):
    """(b, KL(full)) of the least-squares line log KL = a + b·log k through (k, KL_k), k = 1.."""
    xs, ys = [math.log(k) for k in range(1, len(kls) + 1)], [math.log(max(kl, 1e-6)) for kl in kls]
    if len(xs) == 1:  # one point: KL ∝ k² (a drift in a fixed direction)
        return 2.0, kls[0] * full ** 2
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return b, math.exp(my + b * (math.log(full) - mx))


def bounds(kls, full):
    """(KL if it stays at the measured level, KL if it grows linearly in k) after `full` updates."""
    return sum(kls) / len(kls), full * sum(kl / k for k, kl in enumerate(kls, 1)) / len(kls)


def main(args):
    for lr in args.lrs:
        out = os.path.join(args.out, f"lr{lr:g}")
        t0 = time.time()
        subprocess.run([sys.executable, "ppo_gi.py", "--sft", args.sft, "--reward", args.reward, "--data", args.data, "--split", "rl",
                        "--lr", str(lr), "--steps", str(args.updates + 1), "--save_every", "0", "--eval_prompts", "0", "--out", out,
                        *args.flags.split()], cwd=ROOT, check=True)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if "objective/kl" in r]
        kl = [r["objective/kl"] for r in rows]
        with open(os.path.join(out, "ppo_args.json")) as f:
            n = json.load(f)["rollout_batch"]
        tokens = sum(r["perf/gen_tokens_per_s"] * r["perf/gen_s"] / n for r in rows) / len(rows)  # response tokens per rollout
        b, predicted = fit(kl[1:], args.full)
        flat, linear = bounds(kl[1:], args.full)
        print(json.dumps({"lr": lr, "kl_after_k_updates": [round(x, 5) for x in kl], "response_tokens": round(tokens, 1),
                          "kl_per_token": [round(x / tokens, 6) for x in kl], "exponent": round(b, 2),
                          f"predicted_kl_after_{args.full}": round(predicted, 4) if b > 0 else None,
                          f"kl_after_{args.full}_if_flat_or_linear": [round(flat, 4), round(linear, 4)], "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main(parser.parse_args())
