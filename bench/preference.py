"""Throughput of the two preference trainers on a fixed tiny workload (a benchmark, not a test).

Workload: a random-init GPT-2 (2 layers, width 128, 4 heads) with a BPE vocabulary of 4,096
trained here on synthetic words; 256 pairs of 16-token prompts and 28-38-token responses (EOS
included); batch 8; 32 optimizer steps, one epoch. Each trainer runs as a user would run it
(`python reward.py ...`, `python dpo.py ...`) in its own process; pairs/s is measured by the
training loop over its 32 steps (setup, evaluation and saving excluded), peak RSS is the process's.
dpo.py computes π_ref's log-probs of the 256 pairs once before its loop (--precompute_ref 1, the
default): ref_precompute_s, outside pairs/s; 256 / (256 / pairs_per_s + ref_precompute_s) counts it.

    python bench/preference.py            # prints one JSON line per trainer
    python bench/preference.py --steps 2  # a quick run (tests/test_bench.py)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from workload import build_workload, preference_flags  # noqa: E402

STEPS = 32


def run(trainer, folder, python=(sys.executable,), out=None, steps=STEPS):
    """One trainer's JSON line; `python` is the command that runs its script (bench/other_arithmetic.py
    passes its own); `out` must be a folder no earlier run has used (the stages refuse one that holds
    a run)."""
    out = out or os.path.join(folder, trainer)
    cmd = [*python, f"{trainer}.py", *preference_flags(trainer, folder, out, steps)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:  # say why: a stage's check (a refused flag, a wrong directory) ends with its message
        raise SystemExit(f"bench: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = list(map(json.loads, f))
    last = [r for r in rows if "perf/examples_per_s" in r][-1]
    setup = {"ref_precompute_s": round(r["perf/ref_precompute_s"], 2) for r in rows if "perf/ref_precompute_s" in r}
    return {"trainer": trainer, "pairs_per_s": round(last["perf/examples_per_s"], 1),
            "peak_rss_mb": round(last["perf/peak_rss_mb"], 1), **setup}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of 8 pairs per trainer")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be ≥ 1")
    with tempfile.TemporaryDirectory() as folder:
        vocab, n_single = build_workload(folder)
        assert vocab == 4096, f"tokenizer has {vocab} tokens, expected 4096"
        for trainer in ("dpo", "reward"):
            print(json.dumps(run(trainer, folder, steps=args.steps)), flush=True)
