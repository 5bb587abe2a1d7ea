"""reward.py: stage 2, the Bradley-Terry reward model r_ψ(x, y).

Slide: "binary classification: predict rewards consistent with preferences". For each pair the
model scores the chosen and the rejected response and the loss is
    L(ψ) = −log σ( r_ψ(x, y_c) − r_ψ(x, y_r) )
The model is the SFT backbone plus a linear head giving one scalar per token; the reward of a
sequence is the scalar at its last real token (the EOS closing the response), found from the
attention mask, so it is right under left and right padding alike.

    python reward.py                               # on the built-in task, from runs/sft
    torchrun --nproc_per_node 2 reward.py          # the same on 2 processes (FSDP2)
    torchrun --nproc_per_node 8 reward.py --sft runs/sft-7b --data Anthropic/hh-rlhf \\
        --lr 5e-6 --batch_size 64 --max_len 512                                      # 1 node
    torchrun --nnodes 2 --node_rank $RANK --master_addr $HOST --master_port 29500 \\
        --nproc_per_node 8 reward.py ...                                               # 2 nodes

Writes `--out` (default runs/reward): the model (a transformers *ForSequenceClassification with
num_labels=1, so `from_pretrained` reloads it), the tokenizer, reward_stats.json (mean and std of
the scores on the training pairs, for later stages to normalize by), metrics.jsonl, checkpoints/.
"""
import argparse
import collections
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import data
import plumbing
import sft

# fmt: off
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--sft", default="runs/sft", help="SFT model directory (or any model spec plumbing.load_model takes)")
parser.add_argument("--data", default="toy", help="data.py spec of preference pairs")
parser.add_argument("--split", default="train", help="training split, with an optional slice")
parser.add_argument("--eval_split", default=None, help="held-out split; default: toy 'test', else 5%% carved from --split")
parser.add_argument("--stats_pairs", type=plumbing.at_least(1), default=4096, help="training pairs scored at the end for reward_stats.json")
sft.add_training_flags(parser, out="runs/reward", steps=400, lr=1e-3, eval_every=100, save_every=200)
# fmt: on


class RewardModel(torch.nn.Module):
    """Backbone + linear head → one scalar per token. `hf` is a transformers *ForSequenceClassification
    (num_labels=1), used for its backbone (`base_model`) and head (`score`), and for save_pretrained.
    Its own forward is not used: it finds the last token from pad ids, this one from the mask."""

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


def bradley_terry_loss(r_chosen, r_rejected):
    """−log σ(r_c − r_r) per pair (logsigmoid is the stable form of log σ)."""
    return -F.logsigmoid(r_chosen - r_rejected)


def load_reward_model(path, tokenizer, seed=0, dtype=torch.float32):
    return RewardModel(plumbing.load_model(path, tokenizer, seed=seed, head="score", dtype=dtype))


def load_scorer(spec, tokenizer, d, bf16):
    """r_ψ as one callable for PPO, scorer(prompts, texts, ids, mask) -> raw scores [b], with
    scorer.center, the value subtracted before scaling. 'gold': the built-in task's gold judge (scores
    in [0, 1], centre 0.5). Else a reward model directory, frozen (bf16 on CUDA): the scalar at each
    sequence's last real token, centred by its mean score on its training pairs (reward_stats.json)."""
    if spec == "gold":
        def scorer(prompts, texts, ids, mask):
            return torch.tensor([data.gold_score(p, t) for p, t in zip(prompts, texts)], device=ids.device)
        scorer.center = 0.5
        return scorer
    rm = plumbing.shard(load_reward_model(spec, tokenizer, dtype=plumbing.frozen_dtype(d)).eval(), d, bf16=bf16).requires_grad_(False)
    with open(os.path.join(spec, "reward_stats.json")) as f:
        center = json.load(f)["mean"]

    def scorer(prompts, texts, ids, mask):
        return sequence_rewards(rm, ids, mask)
    scorer.center = center
    return scorer


def tokenize_pairs(tokenizer, pairs, max_len, report=None):
    """(prompt ids, chosen ids + EOS, prompt ids, rejected ids + EOS) per preference pair, the
    prompt cut separately for each side so that both fit in max_len, and the pairs kept: a pair
    that the cut made identical on both sides teaches nothing and is dropped. `report` names the
    stage whose line on what --max_len cut is printed. Returns (examples, kept pairs)."""
    examples, kept, counts = [], [], collections.Counter()
    for x in pairs:
        sides = collections.Counter()
        p, c = plumbing.encode(tokenizer, x["prompt"], x["chosen"], max_len=max_len, counts=sides)
        p2, r = plumbing.encode(tokenizer, x["prompt"], x["rejected"], max_len=max_len, counts=sides)
        counts.update({k: 1 for k, v in sides.items() if v})  # a pair counts once, whichever side was cut
        if p + c == p2 + r:
            counts["identical"] += 1
            continue
        examples.append((p, c, p2, r))
        kept.append(x)
    if report:
        plumbing.report_truncation(report, counts, len(pairs), max_len, "pairs")
    return examples, kept


def pair_batch(examples, pad_id):
    """Chosen sequences first, then rejected: ids and mask of shape [2B, T]."""
    seqs = [p + c for p, c, _, _ in examples] + [p + r for _, _, p, r in examples]
    return plumbing.pad_batch(seqs, pad_id)


@torch.no_grad()
def score(model, tokenizer, prompts, responses, batch_size=64, max_len=512):
    """The one scoring function later stages call: a tensor of rewards, one per (prompt, response).
    `model` is a RewardModel, or any rule `fn(prompt, response) -> float` such as data.gold_score,
    so a function reward can be plugged into PPO. Responses are scored with EOS appended."""
    if not isinstance(model, torch.nn.Module):
        return torch.tensor([float(model(p, r)) for p, r in zip(prompts, responses)])
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [sum(plumbing.encode(tokenizer, p, r, max_len=max_len), [])
                for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        ids, mask = plumbing.pad_batch(seqs, tokenizer.pad_token_id)
        out.append(sequence_rewards(model, ids.to(device), mask.to(device)).cpu())
    return torch.cat(out)


def distribution(scores):
    """Mean, std, quantiles and skewness of a reward distribution (the slide's long tail)."""
    s = np.asarray(scores, dtype=np.float64)
    std = s.std()
    q = np.quantile(s, [0.05, 0.25, 0.5, 0.75, 0.95])
    skew = float(((s - s.mean()) ** 3).mean() / std ** 3) if std > 0 else 0.0
    return {"mean": float(s.mean()), "std": float(std), "q05": q[0], "q25": q[1], "q50": q[2], "q75": q[3],
            "q95": q[4], "skewness": skew}


@torch.no_grad()
def pair_scores(score_chunk, examples, d, batch_size=64):
    """[n, 2]: score_chunk(chunk of pairs) -> the chosen sequences' scores, then the rejected ones', for every
    example, computed on this rank's share and gathered from all ranks in the original order."""
    n = len(examples)
    per_rank = math.ceil(n / d.world)
    mine = examples[d.rank * per_rank:(d.rank + 1) * per_rank]
    out = torch.zeros(d.world * per_rank, 2)
    for j, chunk in enumerate(plumbing.equal_chunks(mine, math.ceil(per_rank / batch_size), batch_size)):
        r = score_chunk(chunk or examples[:1]).float().cpu()  # every rank runs as many forwards
        if chunk:
            start = d.rank * per_rank + j * batch_size
            out[start:start + len(chunk)] = torch.stack([r[:len(chunk)], r[len(chunk):]], -1)
    return plumbing.all_reduce_sum(out.to(d.device), d).cpu()[:n]


def pair_rewards(model, examples, pad_id, d, batch_size=64):
    """(r_chosen, r_rejected) for every example, gathered from all ranks in the original order."""
    model.eval()
    return pair_scores(lambda chunk: sequence_rewards(model, *(t.to(d.device) for t in pair_batch(chunk, pad_id))),
                       examples, d, batch_size)


def heldout_metrics(model, examples, pairs, pad_id, d):
    """Accuracy, mean margin and the reward distribution; per true group on the built-in task."""
    r = pair_rewards(model, examples, pad_id, d)
    margin = r[:, 0] - r[:, 1]
    out = {"eval/accuracy": (margin > 0).float().mean().item(), "eval/pairs": len(margin), "eval/margin": margin.mean().item(),
           **{f"eval/reward/{k}": v for k, v in distribution(r.flatten()).items()}}
    groups = [data.true_group(p["prompt"]) for p in pairs]
    for g in sorted(set(groups) - {"other"}):
        idx = torch.tensor([i for i, x in enumerate(groups) if x == g])
        out[f"eval/accuracy/{g}"] = (margin[idx] > 0).float().mean().item()
        out.update({f"eval/reward/{g}/{k}": v for k, v in distribution(r[idx].flatten()).items()})
    return out


def main(args):
    plumbing.check_model_dir(args.sft, "--sft", "lm")
    d, ckpt = sft.start(args, parser, {"--sft": args.sft})
    train, heldout = data.train_and_heldout(data.load_pairs, args.data, args.split, args.eval_split, seed=args.seed)
    source = os.path.join(ckpt, "model") if ckpt else args.sft
    tokenizer = plumbing.load_tokenizer(source)
    model = plumbing.shard(load_reward_model(source, tokenizer, seed=args.seed), d, bf16=args.bf16, compile_blocks=args.compile,
                           checkpointing=args.gradient_checkpointing)
    optimizer = sft.adamw(model, args)
    state = sft.resumed_state(ckpt, model, optimizer, d)
    first = state["step"]
    train_ex, train = tokenize_pairs(tokenizer, train, args.max_len, report="reward")
    heldout_ex, heldout = tokenize_pairs(tokenizer, heldout[:2000], args.max_len)
    log = plumbing.MetricsLog(os.path.join(args.out, "metrics.jsonl"), d, state, report_to=args.report_to)
    if d.main:
        print(f"reward: {args.sft} on {args.data}: {len(train_ex)} train / {len(heldout_ex)} held-out pairs, "
              f"{d.world} process(es), steps {first}..{args.steps}")

    def micro_loss(micro):
        ids, mask = (t.to(d.device) for t in pair_batch(micro, tokenizer.pad_token_id))
        r = sequence_rewards(model, ids, mask)
        r_chosen, r_rejected = r[: len(micro)], r[len(micro):]
        # L(ψ) = −log σ(r_ψ(x, y_c) − r_ψ(x, y_r)), summed here, averaged per pair by the loop
        loss = bradley_terry_loss(r_chosen, r_rejected).sum()
        margin = (r_chosen - r_rejected).detach()
        return loss, {"train/accuracy": (margin > 0).float().sum(), "train/margin": margin.sum()}

    finished = sft.supervised_loop(
        args, d, model, optimizer, tokenizer, train_ex, micro_loss, batch_weight=len,
        evaluate=lambda: heldout_metrics(model, heldout_ex, heldout, tokenizer.pad_token_id, d),
        log=log, first_step=first, name="reward")
    if finished:
        train_scores = pair_rewards(model, train_ex[: args.stats_pairs], tokenizer.pad_token_id, d).flatten()
        stats = {"mean": train_scores.mean().item(), "std": train_scores.std().item(), "n_scores": len(train_scores)}
        if not (math.isfinite(stats["mean"]) and math.isfinite(stats["std"])):  # later stages scale by them
            raise SystemExit(f"reward: the scores of its training pairs are not finite (mean {stats['mean']}, std {stats['std']}); nothing saved")
        summary = heldout_metrics(model, heldout_ex, heldout, tokenizer.pad_token_id, d)
        log.log(args.steps, {**summary, **{f"train_scores/{k}": v for k, v in stats.items()}})
        plumbing.save_model(model, tokenizer, args.out, d, extra={"reward_stats.json": stats, "reward_args.json": vars(args)})
        if d.main:
            print(f"reward: held-out accuracy {summary['eval/accuracy']:.3f}, margin {summary['eval/margin']:.3f}, "
                  f"skewness {summary['eval/reward/skewness']:.2f}; saved {args.out}")
            by_group = {k[len("eval/accuracy/"):]: round(v, 3) for k, v in summary.items() if k.startswith("eval/accuracy/")}
            if by_group:
                print(f"reward: held-out accuracy per true group {json.dumps(by_group)}")
    log.close()
    plumbing.close_distributed(d)


if __name__ == "__main__":
    plumbing.run_main(main, parser)
