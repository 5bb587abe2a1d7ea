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
and checkpoints/step-N/ (every --save_every steps; --resume continues from the newest to the same result).
"""
import argparse
import collections
import math
import os
import time

import torch

import data
import plumbing


# flags that --resume may change: how long, how often to log, evaluate or save; none changes the model, the data or a shape
MAY_CHANGE_ON_RESUME = {"steps", "stop_at", "resume", "save_every", "log_every", "eval_every", "gold_prompts", "max_skipped",
                        "keep_checkpoints", "report_to"}


def add_training_flags(parser, **defaults):
    """The flags SFT, reward.py and dpo.py share (defined before the parser, which uses it); each
    stage passes its own defaults (e.g. out=, lr=)."""
    count, rate = plumbing.at_least(1), plumbing.at_least(0.0, float)
    flags = [  # name, type, default, help
        ("out", str, None, "output directory"),
        ("steps", count, 1000, "optimizer steps"),
        ("batch_size", count, 64, "global batch (examples per optimizer step, all ranks together)"),
        ("grad_accum", count, 1, "micro-batches per rank per optimizer step"),
        ("lr", rate, 2e-3, "peak learning rate (tiny models ~1e-3; ~1e-5 at 7B)"),
        ("warmup", plumbing.at_least(0), 30, "linear warm-up steps, then cosine decay to 10%%"),
        ("weight_decay", rate, 0.0, "AdamW weight decay"),
        ("max_len", plumbing.at_least(2), 128, "max tokens of prompt + response"),
        ("eval_every", count, 250, "held-out evaluation every K steps"),
        ("save_every", plumbing.at_least(0), 250, "checkpoint every K steps (0: never)"),
        ("stop_at", count, None, "stop after this step as if interrupted (for resume tests)"),
        ("seed", int, 1, "seed for init, data order and sampling"),
        ("bf16", int, None, "bf16 autocast compute, fp32 weights (default: on under CUDA, off on CPU)"),
        ("compile", plumbing.at_least(0), 0, "torch.compile each decoder block (1) or not (0)"),
        ("log_every", count, 10, "metrics every K steps"),
        ("max_skipped", plumbing.fraction, 0.1, "fail (no model saved, exit 1) when more than this share of the updates were skipped as non-finite"),
        ("gradient_checkpointing", plumbing.at_least(0), 0, "1: recompute each decoder block's activations in the backward pass (less memory, ~30%% more time)"),
        ("keep_checkpoints", count, 1, "keep the newest K checkpoints in OUT/checkpoints (each a save_pretrained folder per model)"),
    ]
    for name, kind, default, help_ in flags:
        parser.add_argument(f"--{name}", type=kind, default=defaults.pop(name, default), help=help_)
    parser.add_argument("--report_to", choices=["none", "tensorboard"], default="none", help="also log to TensorBoard (OUT/tensorboard; needs the tensorboard package)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest of OUT/checkpoints; only these flags may differ from the "
                        "run being resumed: " + ", ".join(f"--{k}" for k in sorted(MAY_CHANGE_ON_RESUME)))
    if defaults:
        raise TypeError(f"add_training_flags: unknown defaults {sorted(defaults)}")


# fmt: off
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="tiny", help="'tiny' (built from a config), a hub id or directory, a .gguf file, or 'smollm2'")
parser.add_argument("--data", default="toy", help="data.py spec: 'toy', a hub id, a file or a directory")
parser.add_argument("--split", default="train", help="training split, with an optional slice: 'train', 'test[:512]'")
parser.add_argument("--eval_split", default=None, help="held-out split; default: toy 'test', else 5%% carved from --split")
parser.add_argument("--gold_prompts", type=plumbing.at_least(0), default=200, help="toy only: greedy-decode this many test prompts and report gold scores")
add_training_flags(parser, out="runs/sft", steps=1000, lr=2e-3)
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


# ----------------------------------------------------------------------------------------------
# The training loop SFT, reward modelling and DPO share
# ----------------------------------------------------------------------------------------------
def lr_at(step, total, warmup, peak):
    """Linear warm-up to `peak`, then cosine decay to 10% of it at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def start(args, parser, inputs):
    """Process group, seeds, flag checks, --out claimed and checked against `inputs` ({flag: path}),
    and the checkpoint to resume from (or None)."""
    d = plumbing.init_distributed()
    if args.batch_size % (d.world * args.grad_accum):
        parser.error(f"--batch_size {args.batch_size} must divide evenly into {d.world} ranks x --grad_accum {args.grad_accum}")
    plumbing.seed_everything(args.seed)
    args.bf16 = bool(args.bf16) if args.bf16 is not None else d.device.type == "cuda"
    return d, plumbing.start_run(args, parser, d, MAY_CHANGE_ON_RESUME, inputs)


def resumed_state(ckpt, model, optimizer, d):
    """The saved state of the checkpoint (step, the log's length, …), its optimizer and RNG restored;
    a fresh run's: step 0."""
    return plumbing.load_optimizer_state(ckpt, {"model": model}, {"model": optimizer}, d) if ckpt else {"step": 0}


def adamw(model, args):
    return plumbing.optimizer(model, args.lr, args.weight_decay)


def supervised_loop(args, d, model, optimizer, tokenizer, examples, micro_loss, batch_weight, evaluate, log, first_step, name,
                    after_step=None, state=dict, train_mode=True):
    """Optimizer steps first_step..args.steps. Each step takes the global batch (the same on every
    rank), gives this rank its share in --grad_accum micro-batches, and back-propagates
    micro_loss(micro) * world / batch_weight(global batch): a per-example (or per-token) mean over
    the whole global batch, whatever the number of ranks or micro-batches. FSDP2 averages
    gradients over ranks; the factor `world` turns that average into the sum.
    micro_loss(micro) -> (summed loss, {metric: summed value}); evaluate() -> {metric: value};
    after_step(metrics) runs after each applied update and returns more metrics to log; state()
    is what the stage adds to each checkpoint (numbers and lists, e.g. GR-DPO's group weights);
    train_mode=False keeps dropout off (DPO, PPO_DETAILS 1).
    Returns False if --stop_at ended the run early, True when all steps are done."""
    bar = plumbing.progress(range(first_step, args.steps), d, initial=first_step, total=args.steps, desc=name)
    t0, seen, skipped = time.time(), 0, 0
    tokens, busy_s, n_steps = 0, 0.0, 0  # since the last log: non-pad tokens of the global batches, seconds and count of their steps
    for step in bar:
        t_step = time.perf_counter()
        model.train(train_mode)
        batch = [examples[i] for i in plumbing.batch_indices(step, args.batch_size, len(examples), args.seed)]
        norm = batch_weight(batch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        sums = {}
        for micro in plumbing.equal_chunks(batch[d.rank::d.world], args.grad_accum):
            loss, stats = micro_loss(micro)
            (loss * d.world / norm).backward()
            for k, v in {"train/loss": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        totals = plumbing.all_reduce_sum(torch.stack(list(sums.values())), d).tolist()
        metrics = {k: v / norm for k, v in zip(sums, totals)}
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        out = {}
        if not (math.isfinite(metrics["train/loss"]) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)  # never apply (or save) a non-finite update
            out = {"train/skipped": 1, "train/loss": str(metrics["train/loss"]), "train/grad_norm": str(grad_norm)}
            if d.main:
                print(f"{name} step {step + 1}: non-finite loss or gradient ({metrics['train/loss']}, {grad_norm}); update skipped")
            skipped += 1
            plumbing.fail_if_mostly_skipped(name, skipped, min(args.stop_at or args.steps, args.steps) - first_step, args.max_skipped)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            extra = after_step(metrics) if after_step else {}
            seen += len(batch)
            tokens += sum(len(part) for example in batch for part in example)  # an example: a tuple of id lists
            busy_s, n_steps = busy_s + time.perf_counter() - t_step, n_steps + 1
            if (step + 1) % args.log_every == 0 or step == 0:
                out = {**metrics, **extra, "train/grad_norm": grad_norm, "train/lr": optimizer.param_groups[0]["lr"],
                       "perf/examples_per_s": seen / (time.time() - t0), "perf/peak_rss_mb": plumbing.peak_rss_mb(),
                       "perf/step_s": busy_s / n_steps, **plumbing.perf_metrics(tokens, busy_s, d.device)}
                tokens, busy_s, n_steps = 0, 0.0, 0
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        if (step + 1) % args.eval_every == 0 and step + 1 != args.steps:  # the last step's: each stage's main, once
            out.update(evaluate())
        if out:
            log.log(step + 1, out)
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 in (args.steps, args.stop_at)):
            plumbing.save_checkpoint(args.out, step + 1, {"model": model}, {"model": optimizer}, tokenizer,
                                     {"step": step + 1, "args": vars(args), "log_bytes": log.tell(), **state()}, d, keep=args.keep_checkpoints)
        if step + 1 == args.stop_at:
            if d.main:
                print(f"{name}: stopped at step {step + 1} (--stop_at); continue with --resume")
            return False
    return True


def main(args):
    plumbing.check_model_dir(args.model, "--model", "lm")
    d, ckpt = start(args, parser, {"--model": args.model})
    train, heldout = data.train_and_heldout(data.load_demos, args.data, args.split, args.eval_split, seed=args.seed)

    source = os.path.join(ckpt, "model") if ckpt else args.model
    tokenizer = plumbing.load_tokenizer(source, texts=[x["prompt"] + x["response"] for x in train])
    model = plumbing.shard(plumbing.load_model(source, tokenizer, seed=args.seed), d, bf16=args.bf16, compile_blocks=args.compile,
                           checkpointing=args.gradient_checkpointing)
    optimizer = adamw(model, args)
    state = resumed_state(ckpt, model, optimizer, d)
    first = state["step"]
    train_ex = tokenize_demos(tokenizer, train, args.max_len, report="sft")
    heldout_ex = tokenize_demos(tokenizer, heldout[:1000], args.max_len)
    log = plumbing.MetricsLog(os.path.join(args.out, "metrics.jsonl"), d, state, report_to=args.report_to)
    if d.main:
        n_params = sum(p.numel() for p in model.parameters())  # a sharded parameter (DTensor) counts its whole size
        print(f"sft: {args.model} (~{n_params / 1e6:.1f}M params) on {args.data}: {len(train_ex)} train / "
              f"{len(heldout_ex)} held-out demos, {d.world} process(es), steps {first}..{args.steps}")

    def micro_loss(micro):
        ids, mask, lm = (t.to(d.device) for t in make_batch(micro, tokenizer.pad_token_id))
        return response_nll(model, ids, mask, lm)[0], {}

    finished = supervised_loop(
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
    plumbing.run_main(main, parser)
