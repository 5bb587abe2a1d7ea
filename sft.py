"""sft.py: stage 1 of the pipeline, supervised fine-tuning on demonstrations (docs/METHOD.md, "The pipeline").

Next-token loss on the response tokens only (prompt and padding carry no loss), EOS appended, a
per-token mean over the whole global batch: N processes × k accumulation steps give the same update
as 1 process with the whole batch (plumbing.supervised_loop).

    python sft.py                                  # tiny Llama from scratch on the built-in task
    torchrun --nproc_per_node 2 sft.py             # the same run on 2 processes (FSDP2, gloo on CPU)
    torchrun --nproc_per_node 8 sft.py --model meta-llama/Llama-2-7b-hf \\
        --data Anthropic/hh-rlhf --lr 1e-5 --batch_size 64 --grad_accum 2 --max_len 512   # 1 node, 8 GPUs
    python sft.py --model smollm2 --data ../shared/data/hh-rlhf --split "test[:512]"     # a real model

Writes --out (default runs/sft): the model and tokenizer (save_pretrained), metrics.jsonl and
checkpoints/step-000250/ (every --save_every steps; --resume continues from the newest).
"""
import argparse
import collections
import os

import torch

import data
import plumbing
import toy

# fmt: off
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="tiny", help="'tiny' (built from a config), a hub id or directory, a .gguf file, or 'smollm2'")
parser.add_argument("--data", default="toy", help="data.py spec: 'toy', a hub id, a file or a directory")
parser.add_argument("--split", default="train", help="training split, with an optional slice: 'train', 'test[:512]'")
parser.add_argument("--eval_split", default=None, help="held-out split; default: toy 'test', else 5%% carved from --split")
parser.add_argument("--gold_prompts", type=plumbing.at_least(0), default=200, help="toy only: greedy gold on this many test prompts")
plumbing.add_training_flags(parser, out="runs/sft", steps=1000, lr=2e-3)
# fmt: on


def tokenize_demos(tokenizer, demos, max_len, report=None):
    """(prompt ids, response ids + EOS) per demonstration; `report` names the stage whose line on
    what --max_len cut is printed."""
    counts = collections.Counter()
    out = [plumbing.encode(tokenizer, x["prompt"], x["response"], max_len=max_len, counts=counts) for x in demos]
    if report:
        plumbing.report_truncation(report, counts, len(demos), max_len, "demonstrations")
    return out


def make_batch(examples, pad_id):
    """Right-padded ids, attention mask, and a loss mask that is 1 exactly on response tokens."""
    ids, mask = plumbing.pad_batch([p + r for p, r in examples], pad_id)
    loss_mask = torch.zeros_like(mask)
    for i, (p, r) in enumerate(examples):
        loss_mask[i, len(p): len(p) + len(r)] = 1
    return ids, mask, loss_mask


def sequence_logprobs(model, ids, mask, loss_mask):
    """log π(y | x) per row: the summed log-probs of the response tokens (loss_mask 1), and their count.
    Logits are computed only from the batch's first response token on (plumbing.response_logprobs)."""
    first = max(1, int(loss_mask.argmax(-1).min()))  # earliest response token in the batch (argmax: the first 1)
    logp, _ = plumbing.response_logprobs(model, ids, mask, first)
    weights = loss_mask[:, first:].float()
    return (logp * weights).sum(-1), weights.sum(-1)


def response_nll(model, ids, mask, loss_mask):
    """Summed next-token NLL over response tokens, and how many there are."""
    # L(θ) = −Σ_t log π_θ(y_t | x, y_<t), over response tokens
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


def toy_gold(model, tokenizer, n_prompts, d):
    """eval/gold/<group> and eval/gold_mean: greedy gold on the built-in task's first test prompts."""
    gold = toy.gold_by_group(model, tokenizer, [x["prompt"] for x in data.load_prompts("toy", f"test[:{n_prompts}]")], d)
    return {**{f"eval/gold/{g}": v for g, v in gold.items()}, "eval/gold_mean": sum(gold.values()) / len(gold)}


def main(args):
    plumbing.check_model_dir(args.model, "--model", "lm")
    d, ckpt = plumbing.start_training(args, parser, {"--model": args.model})
    train, heldout = data.train_and_heldout(data.load_demos, args.data, args.split, args.eval_split, seed=args.seed)
    source = os.path.join(ckpt, "model") if ckpt else args.model
    tokenizer = plumbing.load_tokenizer(source, texts=[x["prompt"] + x["response"] for x in train])
    model = plumbing.shard(plumbing.load_model(source, tokenizer, seed=args.seed), d, bf16=args.bf16, compile_blocks=args.compile,
                           checkpointing=args.gradient_checkpointing)
    optimizer = plumbing.adamw(model, args)
    state = plumbing.resumed_state(ckpt, model, optimizer, d)
    train_ex = tokenize_demos(tokenizer, train, args.max_len, report="sft")
    heldout_ex = tokenize_demos(tokenizer, heldout[:1000], args.max_len)
    log = plumbing.MetricsLog(os.path.join(args.out, "metrics.jsonl"), d, state, report_to=args.report_to)
    if d.main:
        n_params = sum(p.numel() for p in model.parameters())  # a sharded parameter (DTensor) counts its whole size
        print(f"sft: {args.model} (~{n_params / 1e6:.1f}M params) on {args.data}: {len(train_ex)} train / "
              f"{len(heldout_ex)} held-out demos, {d.world} process(es), steps {state['step']}..{args.steps}")

    def micro_loss(micro, batch):
        ids, mask, lm = (t.to(d.device) for t in make_batch([train_ex[i] for i in micro], tokenizer.pad_token_id))
        return response_nll(model, ids, mask, lm)[0], {}

    evaluate = lambda: {"eval/loss": heldout_loss(model, heldout_ex, tokenizer.pad_token_id, d)}  # noqa: E731
    finished = plumbing.supervised_loop(
        args, d, model, optimizer, tokenizer, train_ex, micro_loss,
        batch_weight=lambda batch: sum(len(train_ex[i][1]) for i in batch),  # per-token mean over the global batch
        evaluate=evaluate, log=log, first_step=state["step"], name="sft")
    if finished:
        summary = {**evaluate(), **(toy_gold(model, tokenizer, args.gold_prompts, d) if args.data == "toy" and args.gold_prompts else {})}
        log.log(args.steps, summary)
        plumbing.save_model(model, tokenizer, args.out, d, extra={"sft_args.json": vars(args)})
        if d.main:
            print("sft: " + "  ".join(f"{k}={v:.3f}" for k, v in summary.items()))
            print(f"sft: saved {args.out}")
    log.close()
    plumbing.close_distributed(d)


if __name__ == "__main__":
    plumbing.run_main(main, parser)
