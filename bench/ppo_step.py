"""Seconds per PPO step on a fixed tiny workload (a benchmark, not a test).

Workload: the random-init GPT-2 of bench/workload.py (2 layers, width 128, 4 heads, BPE vocabulary
4,096) as policy, reference, critic and reward model; 16 prompts of 16 tokens per step; exactly 32
sampled tokens each (EOS suppressed until then); one epoch of 4 minibatches; the groups/grad_cos
diagnostic off (--grad_cos 0: its extra backward is no part of the method; pipeline.sh runs
without it). Each variant runs as a user would run it (`python ppo_gi.py ...`) for 2 warm-up + 8
timed steps; ppo_gi.py times its
own phases (perf/gen_s, perf/score_s, perf/train_s) and the medians over the timed steps are
printed, with the process's peak RSS.

    python bench/ppo_step.py            # prints one JSON line per variant
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

from workload import ROOT, build_workload, ppo_flags

WARMUP, TIMED = 2, 8


def run(variant, folder, python=(sys.executable,), out=None):
    """One variant's JSON line (ppo: --no_gi; gi_ppo); `python` is the command that runs ppo_gi.py
    (bench/other_arithmetic.py passes its own)."""
    out = out or os.path.join(folder, variant)
    cmd = [*python, "ppo_gi.py", *ppo_flags(folder, out, WARMUP + TIMED)] + (["--no_gi"] if variant == "ppo" else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "perf/step_s" in r][WARMUP:]
    med = {k: round(statistics.median(r[f"perf/{k}"] for r in rows), 4) for k in ("step_s", "gen_s", "score_s", "train_s")}
    return {"variant": variant, "step_median_s": med["step_s"], "gen_median_s": med["gen_s"], "score_median_s": med["score_s"],
            "train_median_s": med["train_s"], "peak_rss_mb": round(max(r["perf/peak_rss_mb"] for r in rows), 1), "timed_steps": len(rows)}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        build_workload(folder)
        for variant in ("ppo", "gi_ppo"):
            print(json.dumps(run(variant, folder)), flush=True)
