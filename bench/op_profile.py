"""Where a trainer's time goes on the benchmark workload: torch.profiler's table of operators by
self CPU time (a diagnostic, not a test).

Runs reward.py, dpo.py (bench/preference.py's settings) or ppo_gi.py (bench/ppo_step.py's, GI-PPO)
in this process on bench/workload.py's tiny GPT-2, profiles the training loop (reward, dpo: all 32
steps, and the held-out evaluation on 8 pairs that ends the loop, a few % of it; ppo: the 4th
iteration's rollout and update, separately), and prints the top operators. Optimizer.step's row
gives AdamW: its "CPU total" includes the operators it calls. A last line per table sums the matrix
products (aten::mm, addmm, bmm: the FLOPs torch.profiler counts for them, their self CPU time, the
rate) against the rest of the self CPU time: the products alone bound how fast the call can be. The
first line gives the machine's rate on one 2048 × 2048 product, for comparison.

    OMP_NUM_THREADS=1 python bench/op_profile.py reward      # or dpo, ppo; --rows N
"""
import argparse
import math
import os
import tempfile
import time

import torch
from torch.profiler import profile

from workload import build_workload, ppo_flags, preference_flags  # (it puts the repository on sys.path)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("trainer", choices=["reward", "dpo", "ppo"])
parser.add_argument("--rows", type=int, default=15, help="operators to print")


def profiled(fn, name, rows, call=1):
    """fn, with its `call`-th call profiled; prints that call's table of operators."""
    seen = [0]

    def wrapper(*a, **kw):
        seen[0] += 1
        if seen[0] != call:
            return fn(*a, **kw)
        with profile(with_flops=True) as prof:
            out = fn(*a, **kw)
        ops = prof.key_averages()
        print(f"== {name}")
        print(ops.table(sort_by="self_cpu_time_total", row_limit=rows))
        products = [e for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
        gflop = sum(e.flops for e in products) / 1e9
        ms, total_ms = sum(e.self_cpu_time_total for e in products) / 1e3, sum(e.self_cpu_time_total for e in ops) / 1e3
        print(f"matrix products: {gflop:.2f} GFLOP in {ms:.1f} ms = {gflop / ms * 1e3:.0f} GFLOP/s; "
              f"the rest: {total_ms - ms:.1f} ms of {total_ms:.1f} ms self CPU")
        return out
    return wrapper


def product_rate(n=2048, repeats=10):
    """GFLOP/s of an n × n by n × n float32 product at torch's thread count, best of `repeats`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def main(args, folder):
    print(f"one 2048 x 2048 product, {torch.get_num_threads()} thread(s): {product_rate():.0f} GFLOP/s")
    build_workload(folder)
    out = os.path.join(folder, "out")
    if args.trainer == "ppo":
        import ppo_gi as stage
        flags = ppo_flags(folder, out, steps=4)
        stage.rollout = profiled(stage.rollout, "rollout of iteration 4 (generation and scoring)", args.rows, call=4)
        stage.ppo_update = profiled(stage.ppo_update, "PPO update of iteration 4", args.rows, call=4)
    else:
        stage = __import__(args.trainer)
        flags = preference_flags(args.trainer, folder, out)
        stage.sft.supervised_loop = profiled(stage.sft.supervised_loop, f"{args.trainer} training loop, 32 steps", args.rows)
    stage.main(stage.parser.parse_args(flags))


if __name__ == "__main__":
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with tempfile.TemporaryDirectory() as work:
        main(parser.parse_args(), work)
