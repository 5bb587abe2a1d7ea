"""reward.py: stage 2, the Bradley–Terry reward model r_ψ(x, y) (docs/METHOD.md, "The pipeline").

The SFT backbone plus a linear head gives a scalar per token; a sequence's reward is the one at its
last real token (the response's EOS), found from the attention mask, so any padding side works.

    python reward.py                               # on the built-in task, from runs/sft
    torchrun --nproc_per_node 8 reward.py --sft runs/sft-7b --data Anthropic/hh-rlhf --lr 5e-6 --max_len 512

Writes --out (default runs/reward): the model (a *ForSequenceClassification with one label),
reward_stats.json (its scores' mean and std on the training pairs), metrics.jsonl, checkpoints/.
"""
import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import data
import plumbing
import toy

# fmt: off
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--sft", default="runs/sft", help="SFT model directory (or any model spec plumbing.load_model takes)")
parser.add_argument("--data", default="toy", help="data.py spec of preference pairs")
parser.add_argument("--split", default="train", help="training split, with an optional slice")
parser.add_argument("--eval_split", default=None, help="held-out split; default: toy 'test', else 5%% carved from --split")
parser.add_argument("--stats_pairs", type=plumbing.at_least(1), default=4096, help="training pairs scored at the end for reward_stats.json")
plumbing.add_training_flags(parser, out="runs/reward", steps=400, lr=1e-3, eval_every=100, save_every=200)
# fmt: on


def bradley_terry_loss(r_chosen, r_rejected):
    """−log σ(r_c − r_r) per pair (logsigmoid is the stable form of log σ)."""
    # L(ψ) = −log σ(r_ψ(x, y_c) − r_ψ(x, y_r))
    return -F.logsigmoid(r_chosen - r_rejected)


class RewardModel(torch.nn.Module):
    """Backbone + linear head → a scalar per token. `hf`: a transformers *ForSequenceClassification (num_labels=1),
    for its backbone, head and save_pretrained; its own forward finds the last token from pad ids, this one from the mask."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, ids, mask, return_hidden=False):
        hidden = self.hf.base_model(input_ids=ids, attention_mask=mask, position_ids=plumbing.position_ids(mask),
                                    use_cache=False).last_hidden_state  # no KV cache: one pass, nothing to reuse
        values = self.hf.score(hidden).float().squeeze(-1).clone()  # [B, T]; a tensor of its own: FSDP2 warns of an output view
        return (values, hidden) if return_hidden else values


def last_token_index(mask):
    """Index of the last real token of each row: the rightmost 1 of the attention mask."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask * positions).argmax(-1)


def sequence_rewards(model, ids, mask):
    """r_ψ(x, y) for each row: the per-token scalar at the last real token."""
    values = model(ids, mask)
    return values[torch.arange(ids.shape[0], device=ids.device), last_token_index(mask)]


def load_reward_model(path, tokenizer, seed=0, dtype=torch.float32):
    return RewardModel(plumbing.load_model(path, tokenizer, seed=seed, head="score", dtype=dtype))


def load_scorer(spec, tokenizer, d, bf16):
    """r_ψ as one callable for PPO, scorer(prompts, texts, ids, mask) -> raw scores [b], with
    scorer.center, the value subtracted before scaling. 'gold': the built-in task's gold judge (scores
    in [0, 1], centre 0.5). Else a reward model directory, frozen (bf16 on CUDA): the scalar at each
    sequence's last real token, centred by its mean score on its training pairs (reward_stats.json; .std their std)."""
    if spec == "gold":
        scorer = lambda prompts, texts, ids, mask: torch.tensor([toy.gold_score(p, t) for p, t in zip(prompts, texts)], device=ids.device)  # noqa: E731
        scorer.center = 0.5
        return scorer
    rm = plumbing.shard(load_reward_model(spec, tokenizer, dtype=plumbing.frozen_dtype(d)).eval(), d, bf16=bf16).requires_grad_(False)
    scorer = lambda prompts, texts, ids, mask: sequence_rewards(rm, ids, mask)  # noqa: E731
    with open(os.path.join(spec, "reward_stats.json")) as f:
        scorer.center, scorer.std = map(json.load(f).get, ("mean", "std"))
    return scorer


def pair_batch(examples, pad_id):
    """Chosen sequences first, then rejected: ids and mask of shape [2B, T]."""
    return plumbing.pad_batch([p + c for p, c, _, _ in examples] + [p + r for _, _, p, r in examples], pad_id)


@torch.no_grad()
def score(model, tokenizer, prompts, responses, batch_size=64, max_len=512):
    """The one scoring function later stages call: a tensor of rewards, one per (prompt, response),
    each scored with EOS appended. `model` is a RewardModel, or any rule `fn(prompt, response) -> float`."""
    if not isinstance(model, torch.nn.Module):
        return torch.tensor([float(model(p, r)) for p, r in zip(prompts, responses)])
    model.eval()
    device, out = next(model.parameters()).device, []
    for i in range(0, len(prompts), batch_size):
        seqs = [sum(plumbing.encode(tokenizer, p, r, max_len=max_len), []) for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        ids, mask = plumbing.pad_batch(seqs, tokenizer.pad_token_id)
        out.append(sequence_rewards(model, ids.to(device), mask.to(device)).cpu())
    return torch.cat(out)


def distribution(scores):
    """Mean, std, quantiles and skewness of a reward distribution (the slide's long tail)."""
    s = np.asarray(scores, dtype=np.float64)
    std, q = s.std(), np.quantile(s, [0.05, 0.25, 0.5, 0.75, 0.95])
    skew = float(((s - s.mean()) ** 3).mean() / std ** 3) if std > 0 else 0.0
    return {"mean": float(s.mean()), "std": float(std), "q05": q[0], "q25": q[1], "q50": q[2], "q75": q[3], "q95": q[4], "skewness": skew}


def pair_rewards(model, examples, pad_id, d, batch_size=64):
    """(r_chosen, r_rejected) for every example, gathered from all ranks in the original order."""
    model.eval()
    return plumbing.scores_in_order(lambda chunk: sequence_rewards(model, *(t.to(d.device) for t in pair_batch(chunk, pad_id))),
                                    examples, d, batch_size)


def heldout_metrics(model, examples, pairs, pad_id, d):
    """Accuracy, mean margin and the reward distribution; per group where the pairs have one."""
    r = pair_rewards(model, examples, pad_id, d)
    margin = r[:, 0] - r[:, 1]
    out = {"eval/accuracy": (margin > 0).float().mean().item(), "eval/pairs": len(margin), "eval/margin": margin.mean().item(),
           **{f"eval/reward/{k}": v for k, v in distribution(r.flatten()).items()}}
    for g in data.group_names(pairs):
        idx = torch.tensor([i for i, x in enumerate(pairs) if x.get("group") == g])
        out[f"eval/accuracy/{g}"] = (margin[idx] > 0).float().mean().item()
        out.update({f"eval/reward/{g}/{k}": v for k, v in distribution(r[idx].flatten()).items()})
    return out


def main(args):
    plumbing.check_model_dir(args.sft, "--sft", "lm")
    d, ckpt = plumbing.start_training(args, parser, {"--sft": args.sft})
    train, heldout = data.train_and_heldout(data.load_pairs, args.data, args.split, args.eval_split, seed=args.seed)
    source = os.path.join(ckpt, "model") if ckpt else args.sft
    tokenizer = plumbing.load_tokenizer(source)
    model = plumbing.shard(load_reward_model(source, tokenizer, seed=args.seed), d, bf16=args.bf16, compile_blocks=args.compile,
                           checkpointing=args.gradient_checkpointing)
    optimizer = plumbing.adamw(model, args)
    state = plumbing.resumed_state(ckpt, model, optimizer, d)
    train_ex, train = plumbing.encode_pairs(tokenizer, train, args.max_len, report="reward")
    heldout_ex, heldout = plumbing.encode_pairs(tokenizer, heldout[:2000], args.max_len)
    log = plumbing.MetricsLog(os.path.join(args.out, "metrics.jsonl"), d, state, report_to=args.report_to)
    if d.main:
        print(f"reward: {args.sft} on {args.data}: {len(train_ex)} train / {len(heldout_ex)} held-out pairs, "
              f"{d.world} process(es), steps {state['step']}..{args.steps}")

    def micro_loss(micro, batch):
        ids, mask = (t.to(d.device) for t in pair_batch([train_ex[i] for i in micro], tokenizer.pad_token_id))
        r = sequence_rewards(model, ids, mask)
        r_chosen, r_rejected = r[: len(micro)], r[len(micro):]
        margin = (r_chosen - r_rejected).detach()  # the loop divides every sum by the number of pairs
        return bradley_terry_loss(r_chosen, r_rejected).sum(), {"train/accuracy": (margin > 0).float().sum(), "train/margin": margin.sum()}

    evaluate = lambda: heldout_metrics(model, heldout_ex, heldout, tokenizer.pad_token_id, d)  # noqa: E731
    finished = plumbing.supervised_loop(args, d, model, optimizer, tokenizer, train_ex, micro_loss, batch_weight=len,
                                        evaluate=evaluate, log=log, first_step=state["step"], name="reward")
    if finished:
        train_scores = pair_rewards(model, train_ex[: args.stats_pairs], tokenizer.pad_token_id, d).flatten()
        stats = {"mean": train_scores.mean().item(), "std": train_scores.std().item(), "n_scores": len(train_scores)}
        if not (math.isfinite(stats["mean"]) and math.isfinite(stats["std"])):  # later stages scale by them
            raise SystemExit(f"reward: the scores of its training pairs are not finite (mean {stats['mean']}, std {stats['std']}); nothing saved")
        summary = evaluate()
        log.log(args.steps, {**summary, **{f"train_scores/{k}": v for k, v in stats.items()}})
        plumbing.save_model(model, tokenizer, args.out, d, extra={"reward_stats.json": stats, "reward_args.json": vars(args)})
        if d.main:
            print(f"reward: held-out accuracy {summary['eval/accuracy']:.3f} on {summary['eval/pairs']} pairs, margin "
                  f"{summary['eval/margin']:.3f}, skewness {summary['eval/reward/skewness']:.2f}; saved {args.out}")
    log.close()
    plumbing.close_distributed(d)


if __name__ == "__main__":
    plumbing.run_main(main, parser)
