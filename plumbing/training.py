"""What the trainers share beyond processes and files: the supervised loop of SFT, reward modelling
and DPO (with its flags and its learning-rate schedule), and the running std PPO scales scores by."""
import math
import time

import torch

from plumbing.models import optimizer
from plumbing.processes import all_reduce_sum, batch_indices, equal_chunks, init_distributed, seed_everything
from plumbing.runs import (at_least, fail_if_mostly_skipped, fraction, load_optimizer_state, peak_rss_mb, perf_metrics, progress,
                           save_checkpoint, start_run)

# flags that --resume may change: how long, how often to log, evaluate or save; none changes the model, the data or a shape
MAY_CHANGE_ON_RESUME = {"steps", "stop_at", "resume", "save_every", "log_every", "eval_every", "gold_prompts", "max_skipped",
                        "keep_checkpoints", "report_to"}


def add_training_flags(parser, out, steps, lr, eval_every=250, save_every=250):
    """The flags SFT, reward.py and dpo.py share, with the stage's own defaults for the first five."""
    count, rate = at_least(1), at_least(0.0, float)
    parser.add_argument("--out", default=out, help="output directory")
    parser.add_argument("--steps", type=count, default=steps, help="optimizer steps")
    parser.add_argument("--batch_size", type=count, default=64, help="global batch: examples per optimizer step, all ranks together")
    parser.add_argument("--grad_accum", type=count, default=1, help="micro-batches per rank per optimizer step")
    parser.add_argument("--lr", type=rate, default=lr, help="peak learning rate (tiny models ~1e-3; ~1e-5 at 7B)")
    parser.add_argument("--warmup", type=at_least(0), default=30, help="linear warm-up steps, then cosine decay to 10%% at --steps")
    parser.add_argument("--weight_decay", type=rate, default=0.0, help="AdamW weight decay")
    parser.add_argument("--max_len", type=at_least(2), default=128, help="max tokens of prompt + response")
    parser.add_argument("--eval_every", type=count, default=eval_every, help="held-out evaluation every K steps (and at the end)")
    parser.add_argument("--save_every", type=at_least(0), default=save_every, help="checkpoint every K steps (0: never)")
    parser.add_argument("--stop_at", type=count, default=None, help="stop after this step as if interrupted (for resume tests)")
    parser.add_argument("--seed", type=int, default=1, help="seed for init, data order and sampling")
    parser.add_argument("--bf16", type=int, default=None, help="bf16 autocast compute, fp32 weights (default: on under CUDA only)")
    parser.add_argument("--compile", type=at_least(0), default=0, help="torch.compile each decoder block (1) or not (0)")
    parser.add_argument("--log_every", type=count, default=10, help="metrics every K steps")
    parser.add_argument("--max_skipped", type=fraction, default=0.1, help="fail (exit 1, nothing saved) past this share of skipped updates")
    parser.add_argument("--gradient_checkpointing", type=at_least(0), default=0, help="1: recompute each block in the backward pass")
    parser.add_argument("--keep_checkpoints", type=count, default=1, help="keep the newest K checkpoints in OUT/checkpoints")
    parser.add_argument("--report_to", choices=["none", "tensorboard"], default="none", help="also log to TensorBoard (OUT/tensorboard)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")


def start_training(args, parser, inputs):
    """Process group, seeds, flag checks, --out claimed and checked against `inputs` ({flag: path}),
    and the checkpoint to resume from (or None)."""
    d = init_distributed()
    if args.batch_size % (d.world * args.grad_accum):
        parser.error(f"--batch_size {args.batch_size} must divide evenly into {d.world} ranks x --grad_accum {args.grad_accum}")
    seed_everything(args.seed)
    args.bf16 = bool(args.bf16) if args.bf16 is not None else d.device.type == "cuda"
    return d, start_run(args, parser, d, MAY_CHANGE_ON_RESUME, inputs)


def resumed_state(ckpt, model, opt, d):
    """The checkpoint's saved state (step, the log's length, …), its optimizer and RNG restored; a fresh run's: step 0."""
    return load_optimizer_state(ckpt, {"model": model}, {"model": opt}, d) if ckpt else {"step": 0}


def adamw(model, args):
    return optimizer(model, args.lr, args.weight_decay)


def lr_at(step, total, warmup, peak):
    """Linear warm-up to `peak`, then cosine decay to 10% of it at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def supervised_loop(args, d, model, opt, tokenizer, examples, micro_loss, batch_weight, evaluate, log, first_step, name,
                    after_step=None, state=dict, train_mode=True):
    """Optimizer steps first_step..args.steps. Each step takes the global batch (indices into
    `examples`, the same on every rank), gives this rank its share in --grad_accum micro-batches,
    and back-propagates micro_loss(micro, batch) · world / batch_weight(batch): a per-example (or
    per-token) mean over the whole global batch, whatever the number of ranks or micro-batches
    (FSDP2 averages gradients over ranks; the factor world turns that into the sum).
    micro_loss(micro, batch) -> (summed loss, {metric: summed value}); evaluate() -> {metric: value},
    every --eval_every steps but the last (each stage evaluates its final model itself);
    after_step(metrics, batch) runs after each applied update and returns more metrics to log;
    state() is what the stage adds to each checkpoint; train_mode=False keeps dropout off.
    Returns False if --stop_at ended the run early, True when all steps are done."""
    bar = progress(range(first_step, args.steps), d, initial=first_step, total=args.steps, desc=name)
    t0, seen, skipped = time.time(), 0, 0
    tokens, busy_s, n_steps = 0, 0.0, 0  # since the last log: non-pad tokens of the global batches, seconds and count of their steps
    for step in bar:
        t_step = time.perf_counter()
        model.train(train_mode)
        batch = batch_indices(step, args.batch_size, len(examples), args.seed)
        norm = batch_weight(batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        sums = {}
        for micro in equal_chunks(batch[d.rank::d.world], args.grad_accum):
            loss, stats = micro_loss(micro, batch)
            (loss * d.world / norm).backward()
            for k, v in {"train/loss": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        totals = all_reduce_sum(torch.stack(list(sums.values())), d).tolist()
        metrics = {k: v / norm for k, v in zip(sums, totals)}
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        out = {}
        if not (math.isfinite(metrics["train/loss"]) and math.isfinite(grad_norm)):
            opt.zero_grad(set_to_none=True)  # never apply (or save) a non-finite update
            out = {"train/skipped": 1, "train/loss": str(metrics["train/loss"]), "train/grad_norm": str(grad_norm)}
            if d.main:
                print(f"{name} step {step + 1}: non-finite loss or gradient ({metrics['train/loss']}, {grad_norm}); update skipped")
            skipped += 1
            fail_if_mostly_skipped(name, skipped, min(args.stop_at or args.steps, args.steps) - first_step, args.max_skipped)
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
            extra = after_step(metrics, batch) if after_step else {}
            seen += len(batch)
            tokens += sum(len(part) for i in batch for part in examples[i])  # an example: a tuple of id lists
            busy_s, n_steps = busy_s + time.perf_counter() - t_step, n_steps + 1
            if (step + 1) % args.log_every == 0 or step == 0:
                out = {**metrics, **extra, "train/grad_norm": grad_norm, "train/lr": opt.param_groups[0]["lr"],
                       "perf/examples_per_s": seen / (time.time() - t0), "perf/peak_rss_mb": peak_rss_mb(),
                       "perf/step_s": busy_s / n_steps, **perf_metrics(tokens, busy_s, d.device)}
                tokens, busy_s, n_steps = 0, 0.0, 0
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        if (step + 1) % args.eval_every == 0 and step + 1 != args.steps:
            out.update(evaluate())
        if out:
            log.log(step + 1, out)
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 in (args.steps, args.stop_at)):
            save_checkpoint(args.out, step + 1, {"model": model}, {"model": opt}, tokenizer,
                            {"step": step + 1, "args": vars(args), "log_bytes": log.tell(), **state()}, d, keep=args.keep_checkpoints)
        if step + 1 == args.stop_at:
            if d.main:
                print(f"{name}: stopped at step {step + 1} (--stop_at); continue with --resume")
            return False
    return True


class RunningStd:
    """Running std of a stream of numbers, merged across ranks and kept across iterations (Chan et al.'s
    parallel update of count, mean and M2, in float64); ppo_gi.py scales its scores by it (PPO_DETAILS 8)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, x, d):
        finite = torch.isfinite(x)
        if not finite.all():  # one NaN would leave the std NaN for the rest of the run
            print(f"ppo_gi: RunningStd ignores {int((~finite).sum())} non-finite score(s) of {len(x)}")
        x = x[finite].double()  # sums of squares in float64: float32 can make m2 of equal values negative
        s = all_reduce_sum(torch.stack([x.new_tensor(float(len(x))), x.sum(), (x * x).sum()]), d)
        if s[0] == 0:
            return
        n, mean = s[0].item(), (s[1] / s[0]).item()
        m2 = max((s[2] - s[0] * mean ** 2).item(), 0.0)
        delta, total = mean - self.mean, self.count + n
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self):
        std = math.sqrt(self.m2 / max(self.count - 1, 1)) if self.count > 1 else 1.0
        return std if std > 1e-6 else 1.0  # every score so far the same: nothing to scale by
