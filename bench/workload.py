"""The fixed tiny workload the CPU benchmarks use: a random-init GPT-2 (2 layers, width 128, 4 heads)
with a BPE vocabulary of 4,096 trained on synthetic words, the same backbone as a reward model
(with a random-init score head), and 256 pairs of 16-token prompts with 28-38-token responses (EOS
included)."""
import contextlib
import io
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import plumbing  # noqa: E402


def build_workload(folder, seed=0):
    """Save the random-init GPT-2 + tokenizer to folder/model, the same GPT-2 as a reward model to
    folder/reward_model (made as reward.py makes one: a score head of one output on the backbone, with a
    reward_stats.json of mean 0 and std 1), 256 pairs to folder/pairs.jsonl and their prompts to
    folder/prompts.jsonl: the same files for the same seed in every process (so this code and TRL's
    trainers get one workload)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(6000)})  # sorted: a set's order changes with PYTHONHASHSEED
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(3000)]
    tokenizer = plumbing.train_tiny_tokenizer(corpus, vocab_size=4096)
    single = [w for w in words if len(tokenizer(" " + w)["input_ids"]) == 1]  # words that are one token

    def text(n):
        return " " + " ".join(rng.choice(single) for _ in range(n))

    pairs = [{"prompt": text(16), "chosen": text(rng.randint(27, 37)), "rejected": text(rng.randint(27, 37))}
             for _ in range(256)]
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=len(tokenizer), n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(os.path.join(folder, "model"))
    tokenizer.save_pretrained(os.path.join(folder, "model"))
    with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    with open(os.path.join(folder, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": p["prompt"]}) + "\n" for p in pairs)
    import reward  # a reward-model directory as ppo_gi.py's --reward takes it (plumbing.check_reward_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # its "new reward head" line: the benchmarks' stdout is their JSON lines
        rm = reward.load_reward_model(os.path.join(folder, "model"), tokenizer, seed=seed)
    plumbing.save_model(rm, tokenizer, os.path.join(folder, "reward_model"), plumbing.Dist(), extra={"reward_stats.json": {"mean": 0.0, "std": 1.0}})
    return len(tokenizer), len(single)


def preference_flags(trainer, folder, out, steps=32):
    """reward.py's or dpo.py's flags on the workload: batch 8, 32 steps (bench/preference.py; fewer
    for a quick run), logged once at the end."""
    extra = ["--stats_pairs", "8"] if trainer == "reward" else ["--gold_prompts", "0"]
    return ["--sft", os.path.join(folder, "model"), "--data", os.path.join(folder, "pairs.jsonl"), "--split", "all",
            "--eval_split", "all[:8]", "--out", out, "--steps", str(steps), "--batch_size", "8", "--warmup", "1", "--lr", "1e-4",
            "--max_len", "128", "--log_every", str(steps), "--eval_every", "1000", "--save_every", "0", *extra]


def ppo_flags(folder, out, steps):
    """ppo_gi.py's flags on the workload (bench/ppo_step.py): the GPT-2 as policy and reference, its
    reward-model directory (the same backbone with a score head) as reward model and the critic's
    init; 16 prompts, exactly 32 new tokens, 4 minibatches."""
    return ["--sft", os.path.join(folder, "model"), "--reward", os.path.join(folder, "reward_model"),
            "--data", os.path.join(folder, "prompts.jsonl"), "--split", "all", "--out", out, "--steps", str(steps),
            "--rollout_batch", "16", "--minibatch", "4", "--ppo_epochs", "1", "--max_new_tokens", "32", "--min_new_tokens", "32",
            "--save_every", "0", "--eval_prompts", "0"]
