"""dpo.py: the DPO baseline of the paper's table (Rafailov et al. 2023), trained from the SFT model.

π_ref is the SFT model, frozen: its log-probs of every training pair are computed once, before
training (--precompute_ref 0: in each step). log π(y|x) sums the response tokens' log-probs, EOS
included; the implicit reward β·(log π_θ − log π_ref) is logged as rewards/chosen and /rejected.
GR-DPO (group-robust weights over the data's groups) is study/gr_dpo.py.

    python dpo.py                                  # on the built-in task, from runs/sft
    torchrun --nproc_per_node 8 dpo.py --sft runs/sft-7b --data Anthropic/hh-rlhf --lr 5e-7 --batch_size 64 --max_len 512

Writes --out (default runs/dpo): the policy (save_pretrained), metrics.jsonl, checkpoints/.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

import data
import plumbing
import sft

# fmt: off
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--sft", default="runs/sft", help="SFT model directory: the initial policy and the frozen reference")
parser.add_argument("--data", default="toy", help="data.py spec of preference pairs")
parser.add_argument("--split", default="train", help="training split, with an optional slice")
parser.add_argument("--eval_split", default=None, help="held-out split; default: toy 'test', else 5%% carved from --split")
parser.add_argument("--beta", type=plumbing.at_least(0.0, float, above=True), default=0.1, help="β: strength of the implicit KL constraint to π_ref")
parser.add_argument("--precompute_ref", type=int, choices=[0, 1], default=1, help="1: π_ref's log-probs of the training pairs once, before training")
parser.add_argument("--gold_prompts", type=plumbing.at_least(0), default=200, help="toy only: greedy gold on this many test prompts")
plumbing.add_training_flags(parser, out="runs/dpo", steps=300, lr=2e-4, eval_every=100, save_every=150)
# fmt: on


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Per-pair DPO loss and the implicit rewards β·(log π_θ − log π_ref) of both responses."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    # L = −log σ(β·[(log π_θ(y_c|x) − log π_ref(y_c|x)) − (log π_θ(y_r|x) − log π_ref(y_r|x))])
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


def pair_logprobs(model, examples, pad_id, device):
    """log π(y_c|x) and log π(y_r|x) for a list of tokenized pairs, in one forward pass."""
    seqs = [(p, c) for p, c, _, _ in examples] + [(p, r) for _, _, p, r in examples]
    logp = sft.sequence_logprobs(model, *(t.to(device) for t in sft.make_batch(seqs, pad_id)))[0]
    return logp[: len(examples)], logp[len(examples):]


def pair_stats(pi_c, pi_r, ref_c, ref_r, beta, prefix, weights=None):
    """A batch's (weighted) summed loss, its summed diagnostics (the loop divides by the pairs), the per-pair losses."""
    loss, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    stats = {f"{prefix}rewards/chosen": rc.sum(), f"{prefix}rewards/rejected": rr.sum(),
             f"{prefix}rewards/margin": (rc - rr).sum(), f"{prefix}rewards/accuracy": (rc > rr).float().sum(),
             f"{prefix}logps/chosen": pi_c.sum(), f"{prefix}logps/rejected": pi_r.sum()}
    return (loss if weights is None else loss * weights).sum(), stats, loss


@torch.no_grad()
def heldout_metrics(policy, reference, examples, pad_id, beta, d, batch_size=64):
    """The same diagnostics on held-out pairs, averaged over all of them (all ranks)."""
    policy.eval()
    sums = None
    for chunk in plumbing.rank_chunks(examples, d, batch_size):
        pi, ref = (pair_logprobs(m, chunk or examples[:1], pad_id, d.device) for m in (policy, reference))
        loss, stats, _ = pair_stats(*pi, *ref, beta, "eval/")
        values = torch.stack([loss, *stats.values()]).float().cpu() * (1.0 if chunk else 0.0)
        sums = values if sums is None else sums + values
    sums = plumbing.all_reduce_sum(sums.to(d.device), d).cpu() / len(examples)
    return dict(zip(["eval/loss", *stats], sums.tolist()))


def reference_logprobs(args, d, reference, train_ex, pad_id):
    """[n, 2]: π_ref's log-probs of the chosen and rejected response of the pairs the run trains on,
    each once (from step 0 even when resuming: the same batches, so a resumed run is exact); 0 elsewhere."""
    used = sorted({i for step in range(args.steps) for i in plumbing.batch_indices(step, args.batch_size, len(train_ex), args.seed)})
    table = torch.zeros(len(train_ex), 2)
    table[used] = plumbing.scores_in_order(lambda chunk: torch.cat(pair_logprobs(reference, chunk, pad_id, d.device)),
                                           [train_ex[i] for i in used], d, batch_size=args.batch_size // (d.world * args.grad_accum))
    return table


def main(args, group_weights=None):
    """DPO. `group_weights` (study/gr_dpo.py: GR-DPO) weighs each pair by its group: .load_kw (data), .start(pairs,
    state), .weights(micro, batch) (a weight per pair), .group_sums(micro, losses), .after_step and .state (the loop)."""
    plumbing.check_model_dir(args.sft, "--sft", "lm")
    d, ckpt = plumbing.start_training(args, parser, {"--sft": args.sft})
    train, heldout = data.train_and_heldout(data.load_pairs, args.data, args.split, args.eval_split, seed=args.seed,
                                            **(group_weights.load_kw if group_weights else {}))
    source = os.path.join(ckpt, "model") if ckpt else args.sft
    tokenizer = plumbing.load_tokenizer(source)
    policy = plumbing.shard(plumbing.load_model(source, tokenizer, seed=args.seed), d, bf16=args.bf16, compile_blocks=args.compile,
                            checkpointing=args.gradient_checkpointing)
    reference = plumbing.shard(plumbing.load_model(args.sft, tokenizer, seed=args.seed, dtype=plumbing.frozen_dtype(d)), d,
                               bf16=args.bf16, compile_blocks=args.compile)
    reference.eval().requires_grad_(False)  # π_ref stays the SFT model
    optimizer = plumbing.adamw(policy, args)
    state = plumbing.resumed_state(ckpt, policy, optimizer, d)
    train_ex, train = plumbing.encode_pairs(tokenizer, train, args.max_len, report="dpo")
    heldout_ex, _ = plumbing.encode_pairs(tokenizer, heldout[:1000], args.max_len)
    log = plumbing.MetricsLog(os.path.join(args.out, "metrics.jsonl"), d, state, report_to=args.report_to)
    if d.main:
        print(f"dpo: {args.sft} on {args.data}: {len(train_ex)} train / {len(heldout_ex)} held-out pairs, "
              f"beta {args.beta}, {d.world} process(es), steps {state['step']}..{args.steps}")
    t0, pad = time.perf_counter(), tokenizer.pad_token_id
    # π_ref is frozen: over several epochs a step would recompute the same numbers
    ref_table = reference_logprobs(args, d, reference, train_ex, pad) if args.precompute_ref else None
    if args.precompute_ref and state["step"] == 0:  # (a resumed run logged it before its checkpoint)
        log.log(0, {"perf/ref_precompute_s": time.perf_counter() - t0})
    if group_weights:
        group_weights.start(train, state)

    def micro_loss(micro, batch):
        pairs = [train_ex[i] for i in micro]
        with torch.no_grad():  # π_ref's log-probs: the table's, or computed now
            ref_c, ref_r = ref_table[micro].to(d.device).unbind(-1) if ref_table is not None else pair_logprobs(reference, pairs, pad, d.device)
        pi_c, pi_r = pair_logprobs(policy, pairs, pad, d.device)
        weights = group_weights.weights(micro, batch).to(d.device) if group_weights else None
        total, stats, losses = pair_stats(pi_c, pi_r, ref_c, ref_r, args.beta, "train/", weights)
        return total, {**stats, **(group_weights.group_sums(micro, losses.detach()) if group_weights else {})}

    evaluate = lambda: heldout_metrics(policy, reference, heldout_ex, pad, args.beta, d)  # noqa: E731
    finished = plumbing.supervised_loop(args, d, policy, optimizer, tokenizer, train_ex, micro_loss, batch_weight=len, evaluate=evaluate,
                                        log=log, first_step=state["step"], name="dpo", train_mode=False,
                                        **({"after_step": group_weights.after_step, "state": group_weights.state} if group_weights else {}))
    if finished:
        summary = {**evaluate(), **(sft.toy_gold(policy, tokenizer, args.gold_prompts, d) if args.data == "toy" and args.gold_prompts else {})}
        log.log(args.steps, summary)
        plumbing.save_model(policy, tokenizer, args.out, d, extra={"dpo_args.json": vars(args)})
        if d.main:
            keys = ["eval/rewards/accuracy", "eval/rewards/margin", "eval/logps/chosen", "eval/logps/rejected", "eval/gold_mean"]
            print("dpo: " + "  ".join(f"{k}={summary[k]:.3f}" for k in keys if k in summary) + f"; saved {args.out}")
    log.close()
    plumbing.close_distributed(d)


if __name__ == "__main__":
    plumbing.run_main(main, parser)
