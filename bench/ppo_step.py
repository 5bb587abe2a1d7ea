"""Seconds per PPO step on a fixed tiny workload (a benchmark, not a test).

Workload: the random-init GPT-2 of bench/workload.py (2 layers, width 128, 4 heads, BPE vocabulary
4,096) as policy and reference, and the same GPT-2 with a score head (the workload's reward-model
directory) as reward model and the critic's init; 16 prompts of 16 tokens per step; exactly 32
sampled tokens each (EOS suppressed until then); one epoch of 4 minibatches. Each variant runs as a user would run it (`python ppo_gi.py ...`) for 2 warm-up + 8
timed steps; ppo_gi.py times its
own phases (perf/gen_s, perf/score_s, perf/train_s) and the medians over the timed steps are
printed, with the process's peak RSS.

    python bench/ppo_step.py                        # prints one JSON line per variant
    python bench/ppo_step.py --warmup 1 --timed 1   # a quick run (tests/test_bench.py)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from workload import ROOT, build_workload, ppo_flags

WARMUP, TIMED = 2, 8


def run(variant, folder, python=(sys.executable,), out=None, warmup=WARMUP, timed=TIMED):
    """One variant's JSON line (ppo: --no_gi; gi_ppo); `python` is the command that runs ppo_gi.py
    (bench/other_arithmetic.py passes its own); `out` must be a folder no earlier run has used
    (ppo_gi.py refuses one that holds a run)."""
    out = out or os.path.join(folder, variant)
    cmd = [*python, "ppo_gi.py", *ppo_flags(folder, out, warmup + timed)] + (["--no_gi"] if variant == "ppo" else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:  # say why: a stage's check (a refused flag, a wrong directory) ends with its message
        raise SystemExit(f"bench: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "perf/step_s" in r][warmup:]
    med = {k: round(statistics.median(r[f"perf/{k}"] for r in rows), 4) for k in ("step_s", "gen_s", "score_s", "train_s")}
    return {"variant": variant, "step_median_s": med["step_s"], "gen_median_s": med["gen_s"], "score_median_s": med["score_s"],
            "train_median_s": med["train_s"], "peak_rss_mb": round(max(r["perf/peak_rss_mb"] for r in rows), 1), "timed_steps": len(rows)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=WARMUP, help="warm-up steps, not timed")
    parser.add_argument("--timed", type=int, default=TIMED, help="timed steps (the medians are over these)")
    args = parser.parse_args()
    if args.warmup < 0 or args.timed < 1:
        parser.error("--warmup must be ≥ 0 and --timed ≥ 1")
    with tempfile.TemporaryDirectory() as folder:
        build_workload(folder)
        for variant in ("ppo", "gi_ppo"):
            print(json.dumps(run(variant, folder, warmup=args.warmup, timed=args.timed)), flush=True)
