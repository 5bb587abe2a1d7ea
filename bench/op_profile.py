"""Where a trainer's time goes: torch.profiler's table of operators (a diagnostic, not a test).

Runs reward.py, dpo.py (bench/preference.py's settings) or ppo_gi.py (bench/ppo_step.py's, GI-PPO,
with the workload's reward-model directory as reward model and critic) in this process on
bench/workload.py's tiny GPT-2, profiles the training loop (reward, dpo: all 32 steps, and the
held-out evaluation on 8 pairs that ends the loop, a few % of it; ppo: the 4th iteration's rollout
and update, separately; with --steps N: N steps, ppo's N-th iteration profiled), and prints the
top operators by self CPU time (on CUDA: by self GPU time). Optimizer.step's row gives AdamW: its
"CPU total" includes the operators it calls. A summary line per table sums the matrix products
(aten::mm, addmm, bmm, baddbmm: the FLOPs torch.profiler counts for them, their self time, the
rate) against the rest of the self time: the products alone bound how fast the call can be; a JSON
line repeats it with the top operators. The first line gives the machine's rate on one large
product (CPU: 2048² float32; CUDA: 8192² bf16). `--flags` replaces the workload's flags with a
stage's own (sft.py, whose loop is profiled whole, needs them; bench/gpu_check.py's sft_profile
stage passes its SFT flags).

    OMP_NUM_THREADS=1 python bench/op_profile.py reward      # or dpo, ppo; --rows N
    python bench/op_profile.py ppo --steps 1 --rows 3        # a quick run (tests/test_bench.py)
    python bench/op_profile.py sft --flags "--model M --data D --steps 4 ..."
"""
import argparse
import json
import math
import os
import shlex
import tempfile
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import profile

from workload import build_workload, ppo_flags, preference_flags  # (it puts the repository on sys.path)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("trainer", choices=["reward", "dpo", "ppo", "sft"])
parser.add_argument("--rows", type=int, default=15, help="operators to print")
parser.add_argument("--steps", type=int, default=None, help="the workload's steps (default: reward, dpo 32; ppo 4, the last profiled)")
parser.add_argument("--flags", default=None, help="the stage's own flags, in one string, instead of the workload's (sft: required)")
PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


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
        kernels = [e for e in ops if e.device_type == DeviceType.CUDA]  # GPU work, if the call did any
        key, where = ("self_device_time_total", "self GPU") if kernels else ("self_cpu_time_total", "self CPU")
        print(f"== {name}")
        print(ops.table(sort_by=key, row_limit=rows))
        operators = [e for e in ops if e.device_type == DeviceType.CPU]  # on CUDA: each one's time is its kernels'
        gflop = sum(e.flops for e in operators if e.key in PRODUCTS) / 1e9
        ms = sum(getattr(e, key) for e in operators if e.key in PRODUCTS) / 1e3
        # on CUDA the kernels carry the GPU time (the operators above them carry it again): sum only theirs
        total_ms = sum(getattr(e, key) for e in (kernels or operators)) / 1e3
        print(f"matrix products: {gflop:.2f} GFLOP in {ms:.1f} ms = {gflop / max(ms, 1e-9) * 1e3:.0f} GFLOP/s; "
              f"the rest: {total_ms - ms:.1f} ms of {total_ms:.1f} ms {where}")
        top = sorted(operators, key=lambda e: -getattr(e, key))[:8]
        print(json.dumps({"profile": name, "time": where, "product_gflop": round(gflop, 2), "product_ms": round(ms, 1),
                          "total_ms": round(total_ms, 1), "top_ms": [[e.key[:60], round(getattr(e, key) / 1e3, 1)] for e in top]}))
        return out
    return wrapper


def product_rate(repeats=10):
    """GFLOP/s of one n × n by n × n product, best of `repeats`: CPU 2048² float32 at torch's thread
    count, CUDA 8192² bf16 (what the card's matrix units reach, to read MFU against)."""
    cuda = torch.cuda.is_available()
    n, dtype, device = (8192, torch.bfloat16, "cuda") if cuda else (2048, torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = math.inf
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # a CUDA product returns before it is done
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9, f"{n} x {n} {str(dtype)[6:]}"


def main(args, folder):
    rate, what = product_rate()
    on = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU thread(s)"
    print(f"one {what} product, {on}: {rate:.0f} GFLOP/s")
    if args.trainer == "sft" and not args.flags:
        parser.error("sft: give its flags with --flags (the benchmark workload has no SFT demonstrations)")
    if args.steps is not None and (args.steps < 1 or args.flags):
        parser.error("--steps: a count ≥ 1, for the workload (with --flags, give the stage's own --steps there)")
    ppo_steps = args.steps or 4
    if args.trainer == "ppo":
        import ppo_gi as stage
        stage.rollout = profiled(stage.rollout, f"rollout of iteration {ppo_steps} (generation and scoring)", args.rows, call=ppo_steps)
        stage.ppo_update = profiled(stage.ppo_update, f"PPO update of iteration {ppo_steps}", args.rows, call=ppo_steps)
    else:
        stage = __import__(args.trainer)  # its loop is plumbing's, which the stage calls as plumbing.supervised_loop
        stage.plumbing.supervised_loop = profiled(stage.plumbing.supervised_loop, f"{args.trainer} training loop", args.rows)
    if args.flags:
        flags = shlex.split(args.flags)
    else:
        build_workload(folder)
        out = os.path.join(folder, "out")
        flags = (ppo_flags(folder, out, steps=ppo_steps) if args.trainer == "ppo"
                 else preference_flags(args.trainer, folder, out, steps=args.steps or 32))
    stage.main(stage.parser.parse_args(flags))


if __name__ == "__main__":
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with tempfile.TemporaryDirectory() as work:
        main(parser.parse_args(), work)
