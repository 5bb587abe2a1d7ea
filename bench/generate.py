"""Generation alone: plumbing.generate's hand-written loop against transformers' generate (a
benchmark, not a test).

Workload: bench/ppo_step.py's rollout: the random-init GPT-2 of bench/workload.py, 16 of its
16-token prompts, exactly 32 new tokens sampled at T = 1 (EOS suppressed until then, min_new_tokens),
the dynamic KV cache. Both implementations run in this one process, interleaved call by call (so a
noisy machine slows both alike) for 2 warm-up + 10 timed calls each; one JSON line per
implementation (median wall seconds per call, generated tokens/s, median CPU seconds of this
process: on a shared machine the steadier number), then the ratios and whether the two gave the
same tokens for the same seed on every call; last, the per-token Exp(1) draw of sampling over a
[batch, vocabulary] tensor: torch's exponential_ against plumbing.exponential (median ms of 200
draws each, and whether a seed gives both the same numbers).

    python bench/generate.py                      # the CPU default thread count
    python bench/generate.py --cache static       # another KV cache kind (CUDA: compiled too)
    python bench/generate.py --temperature 0      # greedy
    python bench/generate.py --calls 1 --batch 2 --new_tokens 4   # a quick run (tests/test_bench.py)
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from workload import build_workload

import plumbing  # noqa: E402  (workload puts the repository on sys.path)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--cache", choices=plumbing.CACHE_KINDS, default="dynamic")
parser.add_argument("--calls", type=int, default=10, help="timed calls per implementation")
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--new_tokens", type=int, default=32)
parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")


def timed_call(model, tokenizer, prompts, args, impl, seed):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, cpu0 = time.perf_counter(), time.process_time()
    out = plumbing.generate(model, tokenizer, prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            temperature=args.temperature, max_prompt_len=64, seed=seed, cache=args.cache, impl=impl)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0, time.process_time() - cpu0), out[2]


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as folder:
        build_workload(folder)
        tokenizer = plumbing.load_tokenizer(os.path.join(folder, "model"))
        model = plumbing.load_model(os.path.join(folder, "model"), tokenizer).eval()
        with open(os.path.join(folder, "pairs.jsonl")) as f:
            prompts = [json.loads(line)["prompt"] for line in f][:args.batch]
    plumbing.shard(model, plumbing.Dist(device=device), bf16=device.type == "cuda")
    times, same = {"hf": [], "loop": []}, True
    for call in range(2 + args.calls):
        tokens = {}
        for impl in times:
            seconds, tokens[impl] = timed_call(model, tokenizer, prompts, args, impl, seed=call)
            if call >= 2:
                times[impl].append(seconds)
        same &= torch.equal(tokens["hf"], tokens["loop"])
    n_new = args.batch * args.new_tokens
    med = {impl: [statistics.median(x[k] for x in t) for k in (0, 1)] for impl, t in times.items()}
    for impl, (wall, cpu) in med.items():
        print(json.dumps({"impl": impl, "cache": args.cache, "temperature": args.temperature, "device": device.type,
                          "threads": torch.get_num_threads(), "median_s": round(wall, 4), "tokens_per_s": round(n_new / wall, 1),
                          "cpu_median_s": round(cpu, 4), "calls": len(times[impl])}))
    print(json.dumps({"speedup_loop_over_hf": round(med["hf"][0] / med["loop"][0], 2),
                      "cpu_speedup_loop_over_hf": round(med["hf"][1] / med["loop"][1], 2), "same_tokens": same}))
    print(json.dumps(draw_timing(torch.empty(args.batch, len(tokenizer), device=device))))


def draw_timing(like, n=200):
    """Median ms of one Exp(1) draw shaped like `like`: exponential_ against plumbing.exponential."""
    draws = {"exponential_": lambda: torch.empty_like(like).exponential_(1), "plumbing.exponential": lambda: plumbing.exponential(like)}
    ms = {}
    for name, draw in draws.items():
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            draw()
            if like.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        ms[name] = round(statistics.median(times) * 1e3, 3)
    same = [(torch.manual_seed(7), draw())[1] for draw in draws.values()]
    return {"draw_shape": list(like.shape), "draw_ms": ms, "draw_same_numbers": torch.equal(*same)}


if __name__ == "__main__":
    main(parser.parse_args())
