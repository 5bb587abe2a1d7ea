"""sft.py: stage 1 of the pipeline, supervised fine-tuning on demonstrations.

Next-token loss on the response tokens only (prompt and padding carry no loss), EOS appended.
The loss is a per-token mean over the whole global batch: every micro-batch on every rank divides
its summed NLL by the global token count, so N processes x k accumulation steps give the same
update as 1 process with the whole batch.

    python sft.py                                  # tiny Llama from scratch on the built-in task
    torchrun --nproc_per_node 2 sft.py             # the same run on 2 processes (FSDP2, gloo on CPU)
    torchrun --nproc_per_node 8 sft.py --model meta-llama/Llama-2-7b-hf \\
        --data Anthropic/hh-rlhf --lr 1e-5 --batch_size 64 --grad_accum 2 --max_len 512   # 1 node
    torchrun --nnodes 2 --node_rank $RANK --master_addr $HOST --master_port 29500 \\
        --nproc_per_node 8 sft.py --model ... (same flags)                                 # 2 nodes
    python sft.py --model smollm2 --data ../shared/data/hh-rlhf --split "test[:512]"     # real model

Writes `--out` (default runs/sft): the model and tokenizer (save_pretrained), metrics.jsonl,
and checkpoint/ (every --save_every steps; --resume continues from it to the same result).
"""
import argparse
import os

import torch

import data
import plumbing

# fmt: off
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="tiny", help="'tiny' (built from a config), a hub id or directory, a .gguf file, or 'smollm2'")
parser.add_argument("--data", default="toy", help="data.py spec: 'toy', a hub id, a file or a directory")
parser.add_argument("--split", default="train", help="training split, with an optional slice: 'train', 'test[:512]'")
parser.add_argument("--eval_split", default=None, help="held-out split; default: toy 'test', else 5%% carved from --split")
parser.add_argument("--gold_prompts", type=int, default=200, help="toy only: greedy-decode this many test prompts and report gold scores")
plumbing.add_training_flags(parser, out="runs/sft", steps=1000, lr=2e-3)
# fmt: on


def tokenize_demos(tokenizer, demos, max_len):
    return [plumbing.encode(tokenizer, x["prompt"], x["response"], max_len=max_len) for x in demos]


def make_batch(examples, pad_id):
    """Right-padded ids, attention mask, and a loss mask that is 1 exactly on response tokens."""
    ids, mask = plumbing.pad_batch([p + r for p, r in examples], pad_id)
    loss_mask = torch.zeros_like(mask)
    for i, (p, r) in enumerate(examples):
        loss_mask[i, len(p): len(p) + len(r)] = 1
    return ids, mask, loss_mask


def token_logprobs(logits, ids):
    """log π(a_t | s_t) of each next token: [B, T-1] from logits [B, T, V] and ids [B, T]."""
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def sequence_logprobs(model, ids, mask, loss_mask):
    """log π(y | x) per row: the summed log-probs of the response tokens (loss_mask 1), and their count."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=plumbing.position_ids(mask)).logits
    weights = loss_mask[:, 1:].float()
    return (token_logprobs(logits, ids) * weights).sum(-1), weights.sum(-1)


def response_nll(model, ids, mask, loss_mask):
    """Summed next-token NLL over response tokens, and how many there are."""
    logp, n = sequence_logprobs(model, ids, mask, loss_mask)
    return -logp.sum(), n.sum()


@torch.no_grad()
def heldout_loss(model, examples, pad_id, d, batch_size=64):
    """Per-token NLL on held-out examples, summed over ranks. Padding chunks carry weight 0."""
    model.eval()
    total = torch.zeros(2)
    for chunk in plumbing.rank_chunks(examples, d, batch_size):
        weight = 1.0 if chunk else 0.0
        ids, mask, lm = make_batch(chunk or examples[:1], pad_id)
        nll, n = response_nll(model, ids.to(d.device), mask.to(d.device), lm.to(d.device))
        total += weight * torch.stack([nll.cpu(), n.cpu()])
    total = plumbing.all_reduce_sum(total.to(d.device), d).cpu()
    return (total[0] / total[1]).item()


@torch.no_grad()
def gold_by_group(model, tokenizer, prompts, d, batch_size=50, max_new_tokens=24):
    """Greedy responses to built-in-task prompts, scored by the gold judge: mean per true group."""
    model.eval()
    sums = {g: torch.zeros(2) for g in data.GROUPS}
    for chunk in plumbing.rank_chunks(prompts, d, batch_size):
        texts = plumbing.generate(model, tokenizer, chunk or prompts[:1], max_new_tokens=max_new_tokens)[3]
        for prompt, text in zip(chunk, texts):
            sums[data.true_group(prompt)] += torch.tensor([data.gold_score(prompt, text), 1.0])
    stacked = plumbing.all_reduce_sum(torch.stack(list(sums.values())).to(d.device), d).cpu()
    return {g: (s[0] / s[1]).item() for g, s in zip(sums, stacked) if s[1] > 0}


def main(args):
    d, ckpt = plumbing.start(args, parser)
    train, heldout = data.train_and_heldout(data.load_demos, args.data, args.split, args.eval_split, seed=args.seed)

    source = os.path.join(ckpt, "model") if ckpt else args.model
    tokenizer = plumbing.load_tokenizer(source, texts=[x["prompt"] + x["response"] for x in train])
    model = plumbing.shard(plumbing.load_model(source, tokenizer, seed=args.seed), d, bf16=args.bf16, compile_blocks=args.compile)
    optimizer = plumbing.adamw(model, args)
    first = plumbing.load_optimizer_state(ckpt, {"model": model}, {"model": optimizer}, d)["step"] if ckpt else 0
    train_ex = tokenize_demos(tokenizer, train, args.max_len)
    heldout_ex = tokenize_demos(tokenizer, heldout[:1000], args.max_len)
    log = plumbing.MetricsLog(os.path.join(args.out, "metrics.jsonl"), d, resume=ckpt is not None)
    if d.main:
        n_params = sum(p.numel() for p in model.parameters()) * d.world
        print(f"sft: {args.model} (~{n_params / 1e6:.1f}M params) on {args.data}: {len(train_ex)} train / "
              f"{len(heldout_ex)} held-out demos, {d.world} process(es), steps {first}..{args.steps}")

    def micro_loss(micro):
        ids, mask, lm = (t.to(d.device) for t in make_batch(micro, tokenizer.pad_token_id))
        return response_nll(model, ids, mask, lm)[0], {}

    finished = plumbing.supervised_loop(
        args, d, model, optimizer, tokenizer, train_ex, micro_loss,
        batch_weight=lambda batch: sum(len(r) for _, r in batch),  # per-token mean over the global batch
        evaluate=lambda: {"eval/loss": heldout_loss(model, heldout_ex, tokenizer.pad_token_id, d)},
        log=log, first_step=first, name="sft")
    if finished:
        summary = {"eval/loss": heldout_loss(model, heldout_ex, tokenizer.pad_token_id, d)}
        if args.data == "toy" and args.gold_prompts:
            prompts = [x["prompt"] for x in data.load_prompts("toy", f"test[:{args.gold_prompts}]")]
            gold = gold_by_group(model, tokenizer, prompts, d)
            summary.update({f"eval/gold/{g}": v for g, v in gold.items()})
            summary["eval/gold_mean"] = sum(gold.values()) / len(gold)
        log.log(args.steps, summary)
        plumbing.save_model(model, tokenizer, args.out, d, extra={"sft_args.json": vars(args)})
        if d.main:
            print("sft: " + "  ".join(f"{k}={v:.3f}" for k, v in summary.items()))
            print(f"sft: saved {args.out}")
    log.close()
    plumbing.close_distributed(d)


if __name__ == "__main__":
    main(parser.parse_args())
