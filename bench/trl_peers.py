"""TRL's trainers on the exact workloads of bench/preference.py and bench/ppo_step.py, for comparison
(a benchmark, not a test; TRL is no dependency of this project and lives in its own virtual envs).

Setup and runs, from the clone's root (each TRL environment a folder there; any other path works as well):

    python -m venv .venv-trl116 && .venv-trl116/bin/pip install torch==2.13.0 trl==1.16.0 transformers==5.23.0
    python -m venv .venv-trl029 && .venv-trl029/bin/pip install torch==2.13.0 trl==0.29.1 transformers==5.23.0
    .venv-trl116/bin/python bench/trl_peers.py dpo reward   # DPOTrainer, RewardTrainer: like preference.py's lines
    .venv-trl029/bin/python bench/trl_peers.py ppo          # the last TRL with PPOTrainer: like ppo_step.py's lines
    .venv-trl116/bin/python bench/trl_peers.py dpo reward --steps 2   # a quick run (ppo: --warmup 0 --timed 1; tests/test_bench.py)

Settings: the same model, tokenizer, pairs and prompts (bench/workload.py), batch, steps, lr and
AdamW betas as ours; fp32 on CPU, no gradient checkpointing, no evaluation, saving or reports;
TRL's defaults otherwise (DPO: reference log-probs computed each step, precompute_ref_log_probs
off, as in dpo.py). Each trainer runs in its own process. pairs/s is timed by a callback from the
start of the first optimizer step to the end of the last, as plumbing.supervised_loop times ours (TRL's
dataset tokenization and setup excluded). PPO: 16 prompts per step in 4 minibatches of 4, 1 epoch,
exactly 32 sampled tokens (no stop token), 2 warm-up + 8 timed steps; a step is the time between
consecutive on_step_end calls; gen_s is the time inside TRL's batch_generation and gc_s inside
gc.collect (TRL calls it twice per step). PPO's reward model and critic are the workload's GPT-2
with a new score head, loaded as saved (with GPT-2's Python GELU, as TRL's policy): the same
backbone, of the same size, as the reward-model directory ppo_gi.py scores with.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from workload import build_workload

STEPS, BATCH, WARMUP, TIMED = 32, 8, 2, 8
COMMON = dict(learning_rate=1e-4, adam_beta2=0.95, warmup_steps=1, max_grad_norm=1.0, seed=1, use_cpu=True, bf16=False,
              gradient_checkpointing=False, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=STEPS,
              dataloader_num_workers=0, disable_tqdm=True)


class StepClock(TrainerCallback):
    """Wall-clock stamps: the first on_step_begin, then every on_step_end."""
    def __init__(self):
        self.begin, self.ends = None, []

    def on_step_begin(self, args, state, control, **kw):
        self.begin = self.begin or time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())


def peak_rss_mb():
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def preference(kind, folder, out, steps=STEPS):
    """TRL's DPOTrainer or RewardTrainer for 32 steps (`steps`) of 8 pairs; pairs/s over those steps."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
    model_dir, clock = os.path.join(folder, "model"), StepClock()
    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = Dataset.from_json(os.path.join(folder, "pairs.jsonl"))
    cfg = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, max_length=128, **{**COMMON, "logging_steps": steps})
    if kind == "dpo":
        policy, ref = (AutoModelForCausalLM.from_pretrained(model_dir) for _ in range(2))
        trainer = DPOTrainer(policy, ref_model=ref, args=DPOConfig(beta=0.1, **cfg), train_dataset=pairs,
                             processing_class=tok, callbacks=[clock])
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        trainer = RewardTrainer(model, args=RewardConfig(**cfg), train_dataset=pairs, processing_class=tok, callbacks=[clock])
    trainer.train()
    assert len(clock.ends) == steps
    return {"trainer": f"trl_{kind}", "pairs_per_s": round(steps * BATCH / (clock.ends[-1] - clock.begin), 1),
            "peak_rss_mb": peak_rss_mb()}


def ppo(folder, out, warmup=WARMUP, timed=TIMED):
    """TRL 0.29.1's PPOTrainer on ppo_step.py's workload; medians over the timed steps."""
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer
    model_dir, clock, spent = os.path.join(folder, "model"), StepClock(), {"gen": [], "gc": []}

    def clocked(fn, key):  # wrap a function TRL's loop calls by module name, adding up its seconds per step
        def wrapper(*a, **kw):
            t = time.perf_counter()
            result = fn(*a, **kw)
            spent[key].append((len(clock.ends), time.perf_counter() - t))
            return result
        return wrapper
    ppo_trainer.batch_generation = clocked(ppo_trainer.batch_generation, "gen")
    ppo_trainer.gc = type("gc", (), {"collect": staticmethod(clocked(ppo_trainer.gc.collect, "gc"))})

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [json.loads(line)["prompt"] for line in open(os.path.join(folder, "pairs.jsonl"))]
    data = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})
    policy, ref = (AutoModelForCausalLM.from_pretrained(model_dir) for _ in range(2))
    reward, value = (AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1) for _ in range(2))
    for m in (policy, ref):
        m.generation_config.eos_token_id = None  # as --min_new_tokens 32: every response has exactly 32 tokens
    steps = warmup + timed
    # a rollout of 16 (per_device_train_batch_size) in 4 minibatches, each one optimizer step (gradient_accumulation_steps
    # >1 would make accelerate skip the optimizer steps in between)
    config = PPOConfig(output_dir=out, per_device_train_batch_size=16, gradient_accumulation_steps=1, num_mini_batches=4,
                       num_ppo_epochs=1, total_episodes=16 * steps, local_rollout_forward_batch_size=16,
                       response_length=32, stop_token=None, temperature=1.0, kl_coef=0.05, num_sample_generations=0,
                       **{**COMMON, "learning_rate": 2e-5, "logging_steps": 1})
    trainer = PPOTrainer(config, tok, policy, ref, reward, data, value, callbacks=[clock])
    clock.begin = time.perf_counter()  # PPOTrainer calls no on_step_begin
    trainer.train()
    ends = [clock.begin] + clock.ends
    step_s = [b - a for a, b in zip(ends, ends[1:])][warmup:]
    # spent[...] rows: (steps ended before the call, seconds); gc.collect after on_step_end belongs to the next interval
    per = {k: [sum(s for i, s in v if i == j) for j in range(warmup, steps)] for k, v in spent.items()}
    return {"variant": "trl_ppo", "step_median_s": round(statistics.median(step_s), 4),
            "gen_median_s": round(statistics.median(per["gen"]), 4), "gc_median_s": round(statistics.median(per["gc"]), 4),
            "peak_rss_mb": peak_rss_mb(), "timed_steps": len(step_s)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kinds", nargs="+", choices=["dpo", "reward", "ppo"], help="TRL trainers to run, each in its own process")
    parser.add_argument("--steps", type=int, default=STEPS, help="dpo, reward: optimizer steps of 8 pairs")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="ppo: warm-up steps, not timed")
    parser.add_argument("--timed", type=int, default=TIMED, help="ppo: timed steps")
    parser.add_argument("--one", metavar="FOLDER", default=None, help=argparse.SUPPRESS)  # child process: one trainer on FOLDER's workload
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.timed < 1:
        parser.error("--steps and --timed must be ≥ 1, --warmup ≥ 0")
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("trl_peers.py: TRL is not installed in this environment; run it with the Python of a TRL "
                         "virtual environment (the setup is in this script's docstring)")
    torch.manual_seed(0)
    if args.one:  # child process: one trainer
        (kind,) = args.kinds
        out = os.path.join(args.one, f"trl_{kind}")
        print(json.dumps(ppo(args.one, out, args.warmup, args.timed) if kind == "ppo" else preference(kind, args.one, out, args.steps)))
        sys.exit()
    with tempfile.TemporaryDirectory() as folder:
        build_workload(folder)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        budget = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--timed", str(args.timed)]
        for kind in args.kinds:
            cmd = [sys.executable, __file__, kind, "--one", folder, *budget]
            run = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if run.returncode != 0:
                raise SystemExit(f"trl_peers.py: {kind} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
            print(run.stdout.strip().splitlines()[-1], flush=True)
