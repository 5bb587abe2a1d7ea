"""The fixed tiny workload both benchmarks use: a random-init GPT-2 (2 layers, width 128, 4 heads)
with a BPE vocabulary of 4,096 trained on synthetic words, and 256 pairs of 16-token prompts
with 28-38-token responses (EOS included)."""
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import plumbing  # noqa: E402


def build_workload(folder, seed=0):
    """Save the random-init GPT-2 + tokenizer to folder/model and 256 pairs to folder/pairs.jsonl."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list({"".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(6000)})
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
    model = GPT2LMHeadModel(config)
    model.save_pretrained(os.path.join(folder, "model"))
    tokenizer.save_pretrained(os.path.join(folder, "model"))
    with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    return len(tokenizer), len(single)
