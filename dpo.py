"""dpo.py: the DPO baseline of the paper's table (Rafailov et al. 2023), trained from the SFT model.

    L(θ) = −log σ( β·[ (log π_θ(y_c|x) − log π_ref(y_c|x)) − (log π_θ(y_r|x) − log π_ref(y_r|x)) ] )

π_ref is the SFT model, frozen: its log-probs of every training pair are computed once, before
training (as TRL's precompute_ref_log_probs; --precompute_ref 0 computes them in each step instead).
log π(y|x) sums the response tokens' log-probs, EOS included. The implicit reward of a response
is β·(log π_θ − log π_ref), logged as rewards/chosen and rewards/rejected.

    python dpo.py                                  # on the built-in task, from runs/sft
    torchrun --nproc_per_node 2 dpo.py             # the same on 2 processes (FSDP2)
    torchrun --nproc_per_node 8 dpo.py --sft runs/sft-7b --data Anthropic/hh-rlhf \\
        --lr 5e-7 --batch_size 64 --max_len 512                                        # 1 node
    torchrun --nnodes 2 --node_rank $RANK --master_addr $HOST --master_port 29500 \\
        --nproc_per_node 8 dpo.py ...                                                    # 2 nodes

Writes `--out` (default runs/dpo): the policy (save_pretrained), metrics.jsonl, checkpoints/.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

import data
import plumbing
import reward
import sft

# fmt: off
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--sft", default="runs/sft", help="SFT model directory: the initial policy and the frozen reference")
parser.add_argument("--data", default="toy", help="data.py spec of preference pairs")
parser.add_argument("--split", default="train", help="training split, with an optional slice")
parser.add_argument("--eval_split", default=None, help="held-out split; default: toy 'test', else 5%% carved from --split")
parser.add_argument("--beta", type=plumbing.at_least(0.0, float, above=True), default=0.1, help="β: strength of the implicit KL constraint to π_ref")
parser.add_argument("--precompute_ref", type=int, choices=[0, 1], default=1, help="1: π_ref's log-probs of all training pairs once before training; 0: in every step")
parser.add_argument("--group_by", choices=["harm"], default=None, help="HH-RLHF: fold the four subsets into the groups harmless / helpful (for --group_robust)")
parser.add_argument("--group_robust", action="store_true", help="GR-DPO (Ramesh et al. 2024): the loss is Σ_g α_g·(group g's mean DPO loss), the group weights α moved towards the groups whose loss is higher; needs a `group` on every pair")
parser.add_argument("--robust_step", type=plumbing.at_least(0.0, float), default=0.1, help="GR-DPO: η_α, the exponentiated-gradient step of the group weights α")
parser.add_argument("--gold_prompts", type=plumbing.at_least(0), default=200, help="toy only: greedy-decode this many test prompts and report gold scores")
sft.add_training_flags(parser, out="runs/dpo", steps=300, lr=2e-4, eval_every=100, save_every=150)
# fmt: on


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Per-pair DPO loss and the implicit rewards β·(log π_θ − log π_ref) of both responses."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    # L = −log σ(β·[(log π_θ(y_c|x) − log π_ref(y_c|x)) − (log π_θ(y_r|x) − log π_ref(y_r|x))])
    loss = -F.logsigmoid(chosen_reward - rejected_reward)
    return loss, chosen_reward, rejected_reward


def group_weights_step(alpha, group_losses, present, step_size):
    """GR-DPO's step on the group weights: exponentiated gradient ascent of Σ_g α_g·L_g on the simplex,
    so weight moves to the groups whose loss is higher. Only the groups in the batch (present 1) have
    a loss: they share the weight they held, and a group absent from the batch keeps its own (with
    all present this is the plain step). Equal losses leave α where it was, whatever the group sizes."""
    # for g in the batch B: α_g ← α_g·exp(η_α·L_g) / Σ_{g'∈B} α_g'·exp(η_α·L_g') · (1 − Σ_{g'∉B} α_g');  else α_g stays
    moved = alpha * torch.exp(step_size * group_losses * present)
    held = 1 - (alpha * (1 - present)).sum()
    return torch.where(present > 0, moved / (moved * present).sum() * held, alpha)


def pair_logprobs(model, examples, pad_id, device):
    """log π(y_c|x) and log π(y_r|x) for a list of tokenized pairs, in one forward pass."""
    seqs = [(p, c) for p, c, _, _ in examples] + [(p, r) for _, _, p, r in examples]
    ids, mask, loss_mask = (t.to(device) for t in sft.make_batch(seqs, pad_id))
    logp = sft.sequence_logprobs(model, ids, mask, loss_mask)[0]
    return logp[: len(examples)], logp[len(examples):]


def pair_stats(pi_c, pi_r, ref_c, ref_r, beta, prefix, weights=None, group_idx=None, n_groups=0):
    """The (weighted) summed loss and summed diagnostics of a batch of pairs (the loop divides by the
    number of pairs); with group_idx, each group's summed loss too (GR-DPO's α step)."""
    loss, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    stats = {f"{prefix}rewards/chosen": rc.sum(), f"{prefix}rewards/rejected": rr.sum(),
             f"{prefix}rewards/margin": (rc - rr).sum(), f"{prefix}rewards/accuracy": (rc > rr).float().sum(),
             f"{prefix}logps/chosen": pi_c.sum(), f"{prefix}logps/rejected": pi_r.sum()}
    if group_idx is not None:
        sums = torch.zeros(n_groups, device=loss.device).index_add_(0, group_idx, loss.detach())
        stats.update({f"robust/loss_sum_{g}": sums[g] for g in range(n_groups)})
    return (loss if weights is None else loss * weights).sum(), stats


@torch.no_grad()
def heldout_metrics(policy, reference, examples, pad_id, beta, d, batch_size=64):
    """The same diagnostics on held-out pairs, averaged over all of them (all ranks)."""
    policy.eval()
    sums = None
    for chunk in plumbing.rank_chunks(examples, d, batch_size):
        weight = 1.0 if chunk else 0.0
        pi = pair_logprobs(policy, chunk or examples[:1], pad_id, d.device)
        ref = pair_logprobs(reference, chunk or examples[:1], pad_id, d.device)
        loss, stats = pair_stats(*pi, *ref, beta, "eval/")
        values = torch.stack([loss, *stats.values()]).float().cpu() * weight
        sums = values if sums is None else sums + values
    sums = plumbing.all_reduce_sum(sums.to(d.device), d).cpu() / len(examples)
    return dict(zip(["eval/loss", *stats], sums.tolist()))


def main(args):
    plumbing.check_model_dir(args.sft, "--sft", "lm")
    d, ckpt = sft.start(args, parser, {"--sft": args.sft})
    train, heldout = data.train_and_heldout(data.load_pairs, args.data, args.split, args.eval_split, seed=args.seed,
                                            group_by=args.group_by, need_group=args.group_robust)
    source = os.path.join(ckpt, "model") if ckpt else args.sft
    tokenizer = plumbing.load_tokenizer(source)
    policy = plumbing.shard(plumbing.load_model(source, tokenizer, seed=args.seed), d, bf16=args.bf16, compile_blocks=args.compile,
                            checkpointing=args.gradient_checkpointing)
    reference = plumbing.shard(plumbing.load_model(args.sft, tokenizer, seed=args.seed, dtype=plumbing.frozen_dtype(d)), d,
                               bf16=args.bf16, compile_blocks=args.compile)
    reference.eval().requires_grad_(False)  # π_ref stays the SFT model
    optimizer = sft.adamw(policy, args)
    state = sft.resumed_state(ckpt, policy, optimizer, d)
    first = state["step"]
    train_ex, train = reward.tokenize_pairs(tokenizer, train, args.max_len, report="dpo")
    heldout_ex, _ = reward.tokenize_pairs(tokenizer, heldout[:1000], args.max_len)
    log = plumbing.MetricsLog(os.path.join(args.out, "metrics.jsonl"), d, state, report_to=args.report_to)
    if d.main:
        print(f"dpo: {args.sft} on {args.data}: {len(train_ex)} train / {len(heldout_ex)} held-out pairs, "
              f"beta {args.beta}, {d.world} process(es), steps {first}..{args.steps}")

    ref_table = None
    if args.precompute_ref:  # π_ref is frozen: over several epochs a step would recompute the same numbers
        t0 = time.perf_counter()
        # the pairs the whole run trains on, each once (from step 0 even when resuming: the same batches of
        # the same lengths, so a resumed run's numbers are the uninterrupted run's exactly)
        used = sorted({i for step in range(args.steps) for i in plumbing.batch_indices(step, args.batch_size, len(train_ex), args.seed)})
        reference.eval()
        scores = reward.pair_scores(lambda chunk: torch.cat(pair_logprobs(reference, chunk, tokenizer.pad_token_id, d.device)),
                                    [train_ex[i] for i in used], d, batch_size=args.batch_size // (d.world * args.grad_accum))
        ref_table = {id(train_ex[i]): s for i, s in zip(used, scores)}  # keyed by the example object the loop hands out
        if first == 0:  # (a resumed run logged it before its checkpoint)
            log.log(first, {"perf/ref_precompute_s": time.perf_counter() - t0})

    # GR-DPO: group weights α (uniform at first), the group of each training pair, its global batch's group sizes
    robust = {}
    if args.group_robust:
        names = data.group_names(train)
        robust["alpha"] = torch.tensor(state.get("alpha", [1 / len(names)] * len(names)), dtype=torch.float64)
        robust["group_of"] = {id(x): names.index(pair["group"]) for x, pair in zip(train_ex, train)}
        if d.main:
            print(f"dpo: GR-DPO over {len(names)} groups ({', '.join(names)}), η_α {args.robust_step}")

    def batch_weight(batch):
        if robust:
            robust["counts"] = torch.bincount(torch.tensor([robust["group_of"][id(x)] for x in batch]), minlength=len(names)).double()
        return len(batch)

    def micro_loss(micro):
        if ref_table is not None:
            ref_c, ref_r = torch.stack([ref_table[id(x)] for x in micro]).to(d.device).unbind(-1)
        else:
            with torch.no_grad():
                ref_c, ref_r = pair_logprobs(reference, micro, tokenizer.pad_token_id, d.device)
        pi_c, pi_r = pair_logprobs(policy, micro, tokenizer.pad_token_id, d.device)
        if not robust:
            return pair_stats(pi_c, pi_r, ref_c, ref_r, args.beta, "train/")
        g = torch.tensor([robust["group_of"][id(x)] for x in micro])
        # Σ_g α_g·L_g, L_g the mean loss of group g's pairs in the global batch: pair i weighs α_g·N/n_g (the loop divides by N)
        weights = (robust["alpha"][g] * robust["counts"].sum() / robust["counts"][g]).float().to(d.device)
        return pair_stats(pi_c, pi_r, ref_c, ref_r, args.beta, "train/", weights, g.to(d.device), len(names))

    def after_step(metrics):  # GR-DPO: α steps on this batch's group losses, for the next update
        if not robust:
            return {}
        counts = robust["counts"]
        sums = torch.tensor([metrics.pop(f"robust/loss_sum_{g}") for g in range(len(names))], dtype=torch.float64)
        losses = sums * counts.sum() / counts.clamp(min=1)  # the loop divided the sums by N
        robust["alpha"] = group_weights_step(robust["alpha"], losses, (counts > 0).double(), args.robust_step)
        return {**{f"robust/alpha/{n}": a for n, a in zip(names, robust["alpha"].tolist())},
                **{f"robust/loss/{n}": v for n, v, c in zip(names, losses.tolist(), counts.tolist()) if c}}

    evaluate = lambda: heldout_metrics(policy, reference, heldout_ex, tokenizer.pad_token_id, args.beta, d)  # noqa: E731
    finished = sft.supervised_loop(args, d, policy, optimizer, tokenizer, train_ex, micro_loss, batch_weight=batch_weight,
                                   evaluate=evaluate, log=log, first_step=first, name="dpo", after_step=after_step,
                                   state=lambda: {"alpha": robust["alpha"].tolist()} if robust else {}, train_mode=False)
    if finished:
        summary = evaluate()
        if args.data == "toy" and args.gold_prompts:
            prompts = [x["prompt"] for x in data.load_prompts("toy", f"test[:{args.gold_prompts}]")]
            gold = sft.gold_by_group(policy, tokenizer, prompts, d)
            summary.update({f"eval/gold/{g}": v for g, v in gold.items()}, **{"eval/gold_mean": sum(gold.values()) / len(gold)})
        log.log(args.steps, summary)
        plumbing.save_model(policy, tokenizer, args.out, d, extra={"dpo_args.json": vars(args)})
        if d.main:
            keys = ["eval/rewards/accuracy", "eval/rewards/margin", "eval/logps/chosen", "eval/logps/rejected", "eval/gold_mean"]
            print("dpo: " + "  ".join(f"{k}={summary[k]:.3f}" for k in keys if k in summary) + f"; saved {args.out}")
    log.close()
    plumbing.close_distributed(d)


if __name__ == "__main__":
    plumbing.run_main(main, parser)
