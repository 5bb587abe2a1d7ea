"""One prepared check for a GPU machine with no network: throughput, MFU and memory of every stage.

It builds a 135M Llama (SmolLM2-135M's shape) and a ~1B Llama (Llama-3.2-1B's shape: hidden 2048,
16 layers) from configs, random init, with the GPT-2 tokenizer, and runs the real stages as a user
would (`python sft.py ...`, `reward.py`, `ppo_gi.py`, each in its own process) for a few steps each
on HH-RLHF text at max_len 512. Each stage's numbers are read from its own metrics.jsonl (the
medians over the steps after the warm-up ones). It prints one JSON line per stage and size:

    {"stage", "size", "params_m", "tokens_per_s", "mfu", "gpu_mem_gb", "step_s", ..., "wall_s"}

tokens_per_s counts real (non-pad) tokens: SFT and RM, those of the training batches; GI-PPO, the
prompt + response tokens of the rollout per whole step (generation, scoring, update), with the
generated tokens/s beside it. MFU = 6 · N · tokens_per_s ÷ --peak_tflops (an H100 SXM's dense
bf16 peak by default); for GI-PPO it is nominal (a step does more than one forward + backward per
token). gpu_mem_gb is the stage's peak allocated GPU memory. Stages:
  sft           SFT on packed HH-RLHF text: several transcripts per example, cut to exactly max_len
  sft_compiled  the same with --compile 1 (torch.compile of each decoder block)
  rm            reward model on HH-RLHF pairs as they are (each batch padded to its longest)
  gi_ppo        GI-PPO: 64 prompts x 128 sampled new tokens per step, plumbing's decoding loop, dynamic cache
  generate      plumbing.generate alone: transformers' generate, then the hand-written loop with each KV cache kind
  gi_ppo_compiled  GI-PPO with --generate_cache compiled
  sft_profile   3 steps of sft under torch.profiler (bench/op_profile.py sft): its row gives the matrix
                products' GFLOP and GPU ms against the GPU total, and the top operators; the table goes to --log
Every stage runs in its own try (a failure prints an "error" row and the rest go on), and a stage
is skipped (a "skipped" row) once the --budget_s total time would be exceeded.

    python bench/gpu_check.py --prepare .gpu    # here, once: GPT-2 tokenizer + HH-RLHF pairs into .gpu/
    python bench/gpu_check.py --assets .gpu     # on the GPU machine
    python bench/gpu_check.py --tiny            # on CPU: tiny models, same stages (tests run this)
"""
import argparse
import contextlib
import gzip
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# fmt: off
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--assets", default=os.path.join(ROOT, ".gpu"), help="folder made by --prepare: tokenizer/ and hh-rlhf/test.jsonl.gz")
parser.add_argument("--prepare", metavar="DIR", default=None, help="instead: write the assets folder DIR from --shared, then stop")
parser.add_argument("--shared", default=os.path.join(os.path.dirname(ROOT), "shared"), help="--prepare: the shared folder (models/gpt2-tokenizer, data/hh-rlhf)")
parser.add_argument("--pairs", type=int, default=2000, help="--prepare: HH-RLHF test pairs to copy (half helpful-base, half harmless-base)")
parser.add_argument("--tiny", action="store_true", help="tiny models and workloads, for a CPU (without --assets: the built-in toy task)")
parser.add_argument("--sizes", nargs="+", default=["135m", "1b"], help="model sizes to run")
parser.add_argument("--stages", nargs="+", default=["sft", "sft_compiled", "rm", "gi_ppo", "generate", "gi_ppo_compiled"], help="stages to run (sft_compiled, generate, gi_ppo_compiled, sft_profile: 135m only)")
parser.add_argument("--budget_s", type=float, default=450, help="total time budget: stages that would start after it are skipped, a running one is stopped")
parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the card for MFU (H100 SXM: 989)")
parser.add_argument("--work", default=None, help="scratch folder for models and runs (default: /dev/shm if it has 40 GB free, else a temp folder)")
parser.add_argument("--log", default=None, help="append every stage's command and output to this file")
parser.add_argument("--measure_generate", metavar="MODEL_DIR", default=None, help=argparse.SUPPRESS)  # internal: the generate stage's own process
# fmt: on

HH = "hh-rlhf"  # the assets' data folder (data.py reads DIR/*/test.jsonl.gz and DIR/test.jsonl.gz)
SIZES = {  # Llama shapes; the vocabulary is the tokenizer's (GPT-2's 50,257 + <pad>)
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),  # SmolLM2-135M
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),  # Llama-3.2-1B
}
TINY_SIZES = {
    "135m": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
}
# per size: (SFT batch, grad_accum, steps), (RM batch of pairs, grad_accum, steps), (PPO minibatch, iterations)
WORKLOAD = {"135m": dict(sft=(64, 1, 12), rm=(32, 2, 10), ppo=(32, 5)), "1b": dict(sft=(16, 2, 8), rm=(16, 4, 6), ppo=(8, 4))}
TINY_WORKLOAD = {"135m": dict(sft=(8, 2, 4), rm=(8, 2, 4), ppo=(4, 3)), "1b": dict(sft=(8, 2, 4), rm=(8, 2, 4), ppo=(4, 3))}
FULL = dict(max_len=512, rollout=64, new_tokens=128, warmup=2, generate_calls=3)
TINY = dict(max_len=64, rollout=8, new_tokens=8, warmup=1, generate_calls=2)
CACHE_KINDS = ("dynamic", "static", "compiled")


# ----------------------------------------------------------------------------------------------
# Assets: what the GPU machine cannot download
# ----------------------------------------------------------------------------------------------
def prepare(folder, shared, n_pairs):
    """Copy the GPT-2 tokenizer and n_pairs HH-RLHF test records (half helpful-, half harmless-base)."""
    tok_src = os.path.join(shared, "models", "gpt2-tokenizer")
    if not os.path.isdir(tok_src):
        sys.exit(f"--prepare: no tokenizer at {tok_src} (set --shared)")
    os.makedirs(os.path.join(folder, HH), exist_ok=True)
    shutil.copytree(tok_src, os.path.join(folder, "tokenizer"), dirs_exist_ok=True)
    lines = []
    for subset in ("helpful-base", "harmless-base"):
        with gzip.open(os.path.join(shared, "data", "hh-rlhf", subset, "test.jsonl.gz"), "rt", encoding="utf-8") as f:
            lines += [line for _, line in zip(range(n_pairs // 2), f)]
    with gzip.open(os.path.join(folder, HH, "test.jsonl.gz"), "wt", encoding="utf-8") as f:
        f.writelines(lines)
    size = sum(os.path.getsize(os.path.join(dp, n)) for dp, _, ns in os.walk(folder) for n in ns)
    print(f"gpu_check --prepare: {folder}: tokenizer + {len(lines)} HH-RLHF pairs, {size / 2**20:.1f} MiB")


def toy_assets(folder):
    """--tiny without assets: the built-in task's pairs as JSONL and a tokenizer trained on them."""
    import data
    import plumbing
    pairs = data.load_pairs("toy", "train[:600]")
    os.makedirs(os.path.join(folder, HH), exist_ok=True)
    with open(os.path.join(folder, HH, "test.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    plumbing.train_tiny_tokenizer([p["prompt"] + p["chosen"] for p in pairs]).save_pretrained(os.path.join(folder, "tokenizer"))
    return folder


def packed_demos(tokenizer, assets, path, max_len, n=256):
    """SFT demos of at least max_len tokens: several HH transcripts before the last one's prompt
    (the prompt is cut from the left to fit, so every example is exactly max_len tokens)."""
    import data
    pairs = data.load_pairs(os.path.join(assets, HH), "all")
    demos, context, i = [], "", 0
    while len(demos) < n and i < 50 * n:
        p = pairs[i % len(pairs)]
        i += 1
        if len(tokenizer(context + p["prompt"] + p["chosen"])["input_ids"]) < max_len + 8:
            context += p["prompt"] + p["chosen"]
            continue
        demos.append({"prompt": context + p["prompt"], "response": p["chosen"]})
        context = ""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in demos)
    return len(demos)


def build_model(size_config, tokenizer, folder, device):
    """A random-init Llama saved (bf16) with its tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, attention_dropout=0.0, tie_word_embeddings=True, max_position_embeddings=2048,
                         **size_config)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n_params


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
def stage_command(stage, size, work, assets, cfg, load):
    """The command line of a training stage, and the folder its metrics.jsonl lands in."""
    out = os.path.join(work, size, stage)
    hh = os.path.join(assets, HH)
    common = ["--max_len", str(cfg["max_len"]), "--log_every", "1", "--eval_every", "100000", "--save_every", "0",
              "--warmup", "2", "--lr", "1e-4"]
    if stage in ("sft", "sft_compiled"):
        batch, accum, steps = load["sft"]
        return ["sft.py", "--model", os.path.join(work, size, "init"), "--data", os.path.join(work, "packed"),
                "--split", "all[16:]", "--eval_split", "all[:16]", "--out", out, "--steps", str(steps),
                "--batch_size", str(batch), "--grad_accum", str(accum), "--gold_prompts", "0",
                "--compile", str(int(stage == "sft_compiled")), *common], out
    if stage == "rm":
        batch, accum, steps = load["rm"]
        return ["reward.py", "--sft", os.path.join(work, size, "sft"), "--data", hh, "--split", "all[32:]",
                "--eval_split", "all[:32]", "--out", out, "--steps", str(steps), "--batch_size", str(batch),
                "--grad_accum", str(accum), "--stats_pairs", "64", *common], out
    minibatch, iterations = load["ppo"]
    return ["ppo_gi.py", "--sft", os.path.join(work, size, "sft"), "--reward", os.path.join(work, size, "rm"),
            "--data", hh, "--split", "all", "--out", out, "--steps", str(iterations), "--rollout_batch", str(cfg["rollout"]),
            "--minibatch", str(minibatch), "--max_new_tokens", str(cfg["new_tokens"]), "--max_len", str(cfg["max_len"]),
            "--save_every", "0", "--eval_prompts", "0", "--log_every", "1",
            "--generate_cache", "compiled" if stage == "gi_ppo_compiled" else "dynamic"], out


def run(cmd, timeout, log_path):
    """Run `python cmd...` in the repo root; returns stdout. Raises with the tail of stderr on failure."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable] + cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if log_path:
        with open(log_path, "a") as f:
            f.write(f"\n$ python {' '.join(cmd)}\n[exit {proc.returncode}]\n{proc.stdout}\n{proc.stderr[-20000:]}\n")
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}")
    return proc.stdout


def medians(path, key, warmup):
    """Median of each perf/* value over the rows that have `key`, after the first `warmup` ones."""
    with open(path) as f:
        rows = [r for r in map(json.loads, f) if key in r]
    if not rows:
        raise RuntimeError(f"{path}: no rows with {key}")
    timed = rows[warmup:] or rows[-1:]
    perf = {k: statistics.median(r[k] for r in timed if k in r) for k in timed[-1] if k.startswith("perf/")}
    perf["perf/gpu_mem_gb"] = max((r.get("perf/gpu_mem_gb", 0.0) for r in rows), default=0.0) or None
    perf["timed_steps"] = len(timed)
    return perf


def training_row(stage, size, n_params, perf, peak_tflops, cuda):
    tps = perf["perf/tokens_per_s"]
    row = {"stage": stage, "size": size, "params_m": round(n_params / 1e6, 1), "tokens_per_s": round(tps, 1),
           "mfu": round(6 * n_params * tps / (peak_tflops * 1e12), 4) if cuda else None,
           "gpu_mem_gb": round(perf["perf/gpu_mem_gb"], 2) if perf["perf/gpu_mem_gb"] else None,
           "step_s": round(perf["perf/step_s"], 4), "timed_steps": perf["timed_steps"]}
    if "perf/gen_tokens_per_s" in perf:
        row.update(gen_tokens_per_s=round(perf["perf/gen_tokens_per_s"], 1), gen_s=round(perf["perf/gen_s"], 4),
                   score_s=round(perf["perf/score_s"], 4), train_s=round(perf["perf/train_s"], 4))
    return row


def measure_generate(model_dir, assets, cfg):
    """The generate stage's own process: plumbing.generate (HF, then the loop with each KV cache kind) on the same
    prompts (sampling at T = 1, exactly new_tokens each); one JSON line per kind."""
    import torch

    import data
    import plumbing
    d = plumbing.init_distributed()  # the GPU when there is one (a bare Dist() is the CPU)
    tokenizer = plumbing.load_tokenizer(model_dir)
    model = plumbing.shard(plumbing.load_model(model_dir, tokenizer), d, bf16=d.device.type == "cuda").eval()
    prompts = [x["prompt"] for x in data.load_prompts(os.path.join(assets, HH), "all")][:cfg["rollout"]]
    for impl, kind in [("hf", "dynamic")] + [("loop", k) for k in CACHE_KINDS]:
        try:
            times = []
            for call in range(cfg["generate_calls"]):
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = plumbing.generate(model, tokenizer, prompts, max_new_tokens=cfg["new_tokens"], min_new_tokens=cfg["new_tokens"],
                                        temperature=1.0, max_prompt_len=cfg["max_len"] - cfg["new_tokens"], seed=call, cache=kind, impl=impl)
                times.append(time.perf_counter() - t0)
            n_new = int((out[2] != tokenizer.pad_token_id).sum())
            t = statistics.median(times[1:])
            row = {"impl": impl, "cache": kind, "tokens_per_s": round(n_new / t, 1), "call_s": round(t, 4), "first_call_s": round(times[0], 2),
                   "batch": len(prompts), "new_tokens": cfg["new_tokens"]}
            if d.device.type == "cuda":
                row["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        except Exception as e:  # noqa: BLE001 - one kind failing must not hide the others
            row = {"impl": impl, "cache": kind, "error": f"{type(e).__name__}: {str(e)[-400:]}"}
        print(json.dumps(row), flush=True)


def scratch_folder(requested):
    if requested:
        os.makedirs(requested, exist_ok=True)
        return tempfile.mkdtemp(prefix="gpu_check_", dir=requested)
    shm_ok = os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 40e9
    return tempfile.mkdtemp(prefix="gpu_check_", dir="/dev/shm" if shm_ok else None)


def plan(args):
    """(size, stage) in the order they run: the pipeline per size, then the 135m extras (generate
    per KV cache kind, compiled stages) in the order --stages names them; a short --budget_s skips the last first."""
    order = []
    for size in args.sizes:
        order += [(size, s) for s in ("sft", "rm", "gi_ppo") if s in args.stages]
    if "135m" in args.sizes:
        order += [("135m", s) for s in args.stages if s in ("generate", "sft_compiled", "gi_ppo_compiled", "sft_profile")]
    return order


def main(args):
    cfg, load, sizes = (TINY, TINY_WORKLOAD, TINY_SIZES) if args.tiny else (FULL, WORKLOAD, SIZES)
    unknown = set(args.sizes) - set(sizes)
    if unknown:
        parser.error(f"--sizes: unknown {sorted(unknown)}; known: {sorted(sizes)}")
    if args.measure_generate:
        measure_generate(args.measure_generate, args.assets, cfg)
        return
    t_start = time.time()
    import torch
    import transformers

    import plumbing
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    assets = args.assets
    have_assets = os.path.isdir(os.path.join(assets, "tokenizer"))
    if not (have_assets or args.tiny):
        parser.error(f"--assets {assets}: no tokenizer/ in it; make it with `python bench/gpu_check.py --prepare {assets}` where ../shared is")
    work = scratch_folder(args.work)
    if not have_assets:
        with contextlib.redirect_stdout(sys.stderr):
            assets = toy_assets(os.path.join(work, "assets"))
    print(json.dumps({"check": "gpu_check", "device": torch.cuda.get_device_name() if cuda else "cpu", "peak_tflops": args.peak_tflops,
                      "torch": torch.__version__, "transformers": transformers.__version__, "tiny": args.tiny,
                      "assets": assets if have_assets else "toy", "work": work}), flush=True)
    tokenizer = plumbing.load_tokenizer(os.path.join(assets, "tokenizer"))
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries JSON lines only
        n_packed = packed_demos(tokenizer, assets, os.path.join(work, "packed", "test.jsonl"), cfg["max_len"], n=16 + 64)
    params, done = {}, set()
    try:
        for size, stage in plan(args):
            t_stage = time.time()
            left = args.budget_s - (t_stage - t_start)
            row = {"stage": stage, "size": size}
            needs = {"rm": "sft", "gi_ppo": "rm", "gi_ppo_compiled": "rm"}.get(stage)
            if needs and (size, needs) not in done:
                row["skipped"] = f"needs {needs} of {size}, which did not run"
            elif left < 30:
                row["skipped"] = f"time budget (--budget_s {args.budget_s:.0f}: {left:.0f} s left)"
            else:
                try:
                    if size not in params:
                        params[size] = build_model(sizes[size], tokenizer, os.path.join(work, size, "init"), device)
                    row["params_m"] = round(params[size] / 1e6, 1)
                    if stage == "generate":
                        out = run([os.path.join("bench", "gpu_check.py"), "--measure_generate", os.path.join(work, size, "init"),
                                   "--assets", assets] + (["--tiny"] if args.tiny else []), left, args.log)
                        for line in out.splitlines():
                            if line.startswith("{"):
                                print(json.dumps({"stage": "generate", "size": size, "params_m": row["params_m"], **json.loads(line),
                                                  "wall_s": round(time.time() - t_stage, 1)}), flush=True)
                        done.add((size, stage))
                        continue
                    if stage == "sft_profile":
                        cmd, out_dir = stage_command("sft", size, work, assets, cfg, dict(load[size], sft=(*load[size]["sft"][:2], 3)))
                        cmd[cmd.index(out_dir)] = os.path.join(work, size, stage)  # not over the sft stage's model, which later stages load
                        out = run([os.path.join("bench", "op_profile.py"), "sft", "--rows", "25", "--flags", shlex.join(cmd[1:])], left, args.log)
                        summary = json.loads([line for line in out.splitlines() if line.startswith('{"profile"')][-1])
                        print(json.dumps({**row, **summary, "wall_s": round(time.time() - t_stage, 1)}), flush=True)
                        done.add((size, stage))
                        continue
                    cmd, out_dir = stage_command(stage, size, work, assets, cfg, load[size])
                    run(cmd, left, args.log)
                    key = "perf/step_s" if stage.startswith("gi_ppo") else "perf/tokens_per_s"
                    warmup = cfg["warmup"] + (1 if stage.endswith("compiled") else 0)
                    row = training_row(stage, size, params[size], medians(os.path.join(out_dir, "metrics.jsonl"), key, warmup),
                                       args.peak_tflops, cuda)
                    if stage.startswith("sft"):
                        row["data"] = f"HH-RLHF packed to {cfg['max_len']} tokens ({n_packed} examples)"
                    done.add((size, stage))
                except subprocess.TimeoutExpired:
                    row["error"] = f"stopped at the time budget (--budget_s {args.budget_s:.0f})"
                except Exception as e:  # noqa: BLE001 - one stage failing must not hide the others
                    row["error"] = f"{type(e).__name__}: {str(e)[-600:]}"
                    if args.log:
                        with open(args.log, "a") as f:
                            f.write(traceback.format_exc())
            if "skipped" not in row:
                row["wall_s"] = round(time.time() - t_stage, 1)  # the stage's process, start to end (model build included)
            print(json.dumps(row), flush=True)
            if size != "135m" and stage == "gi_ppo":  # the big size's files are done with
                shutil.rmtree(os.path.join(work, size), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"check": "gpu_check", "total_s": round(time.time() - t_start, 1)}), flush=True)


if __name__ == "__main__":
    cli = parser.parse_args()
    if cli.prepare:
        prepare(cli.prepare, cli.shared, cli.pairs)
    else:
        main(cli)
