"""What the faster kernels torch offers would buy on the benchmark workloads (a benchmark, not a test).

The trainers keep AdamW's foreach form (the per-tensor update bit for bit) and GPT-2's tanh GELU, so
that the runs in RESULTS.md reproduce. This script runs them as bench/preference.py and
bench/ppo_step.py do (reward.py, dpo.py, ppo_gi.py in GI-PPO mode, each in its own process), with
one of these swapped in by this script, not by any flag of the stages:

  as_is        the code as it is
  fused_adamw  torch's fused CPU AdamW: one kernel per tensor, which rounds differently
  erf_gelu     fused AdamW, and GELU's erf form in place of GPT-2's tanh form: a faster kernel for
               another function, measured for its speed, not a model anyone should train

Each round runs every variant of a trainer back to back, in an order that rotates between rounds;
one JSON line per run with its speed-up over as_is in the same round (the ratio of pairs/s, DPO's
with π_ref's precompute counted; PPO: of median step times). Multiplied by a round's ratio against
TRL (bench/trl_peers.py), it says where a variant would stand against the targets.

    OMP_NUM_THREADS=1 python bench/other_arithmetic.py --rounds 3
    python bench/other_arithmetic.py --rounds 1 --work reward gi_ppo --steps 2 --warmup 0 --timed 1   # a quick run (tests/test_bench.py)
"""
import argparse
import json
import os
import runpy
import sys
import tempfile

import torch
from transformers.activations import GELUTanh

import ppo_step
import preference
from workload import ROOT, build_workload

VARIANTS = ("as_is", "fused_adamw", "erf_gelu")
WORK = ("reward", "dpo", "gi_ppo")


def apply(variant, patch=setattr):
    """Swap in the variant's kernels with `patch` (setattr; tests pass monkeypatch.setattr)."""
    if variant not in VARIANTS:
        raise SystemExit(f"other_arithmetic.py: unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    if variant == "as_is":
        return
    adamw_init = torch.optim.AdamW.__init__

    def fused_adamw_init(self, params, *args, **kw):  # plumbing.optimizer asks for foreach on CPU
        adamw_init(self, params, *args, **{**kw, "foreach": None, "fused": True})
    patch(torch.optim.AdamW, "__init__", fused_adamw_init)
    if variant == "erf_gelu":  # plumbing.fused_gelu gives GPT-2 GELUTanh modules: make them compute the erf form
        patch(GELUTanh, "forward", lambda self, x: torch.nn.functional.gelu(x))


def child(variant, script, args):
    """Run `python script args` in this process with the variant applied."""
    apply(variant)
    sys.argv = [script, *args]  # the repository is on sys.path already (workload puts it there)
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


def one_run(work, variant, folder, tag, args):
    python = (sys.executable, os.path.abspath(__file__), "--child", variant)
    out = os.path.join(folder, f"{work}-{variant}-{tag}")  # a fresh --out per run (the stages refuse a used one)
    if work == "gi_ppo":
        line = ppo_step.run("gi_ppo", folder, python=python, out=out, warmup=args.warmup, timed=args.timed)
        return line, 1.0 / line["step_median_s"]
    line = preference.run(work, folder, python=python, out=out, steps=args.steps)
    # dpo: with π_ref's precompute counted, as bench/preference.py counts it (8 pairs a step: 256 pairs in 32 steps)
    pairs = 8 * args.steps
    return line, 1.0 / (pairs / line["pairs_per_s"] + line.get("ref_precompute_s", 0.0))


def main(args):
    with tempfile.TemporaryDirectory() as folder:
        build_workload(folder)
        for r in range(args.first_round, args.first_round + args.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            for work in args.work:
                runs = {v: one_run(work, v, folder, r, args) for v in order}
                for v in VARIANTS:
                    line, speed = runs[v]
                    print(json.dumps({**line, "round": r, "work": work, "variant": v,
                                      "speedup_over_as_is": round(speed / runs["as_is"][1], 3)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        if len(sys.argv) < 4:
            raise SystemExit("other_arithmetic.py --child VARIANT SCRIPT [ARGS...]: give the variant and the stage's script")
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant of every trainer")
        parser.add_argument("--first_round", type=int, default=0, help="the first round's number (the order of the variants rotates with it)")
        parser.add_argument("--work", nargs="+", choices=WORK, default=list(WORK), help="which trainers")
        parser.add_argument("--steps", type=int, default=preference.STEPS, help="reward, dpo: optimizer steps of 8 pairs (bench/preference.py's)")
        parser.add_argument("--warmup", type=int, default=ppo_step.WARMUP, help="gi_ppo: warm-up steps, not timed (bench/ppo_step.py's)")
        parser.add_argument("--timed", type=int, default=ppo_step.TIMED, help="gi_ppo: timed steps (bench/ppo_step.py's)")
        args = parser.parse_args()
        if args.rounds < 1 or args.steps < 1 or args.warmup < 0 or args.timed < 1:
            parser.error("--rounds, --steps and --timed must be ≥ 1, --warmup ≥ 0")
        main(args)
