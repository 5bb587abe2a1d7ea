"""study/inspect_groups.py: the inferred groups of saved rollouts (ppo_gi.py writes OUT/rollouts.jsonl)
under a critic's group head: each group's soft size and mean reward, g_high, and on the built-in task
how they line up with the true groups (the slide: "our method can identify simple and difficult
groups"; RESULTS.md, "Inferred groups against the true groups"). --fit_steps fits φ here first:
Stage 1 alone, on frozen features.

    python study/inspect_groups.py --rollouts runs/gi_ppo/rollouts.jsonl --critic runs/gi_ppo/critic
    python study/inspect_groups.py --rollouts runs/ppo/rollouts.jsonl --critic runs/reward --fit_steps 200
"""
import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import groups  # noqa: E402
import plumbing  # noqa: E402
import reward  # noqa: E402
import toy  # noqa: E402

# fmt: off
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--rollouts", default="runs/gi_ppo/rollouts.jsonl", help="JSONL of {prompt, response, reward} (ppo_gi.py writes one)")
parser.add_argument("--critic", default="runs/gi_ppo/critic", help="critic directory (with its group head) or a reward model directory")
parser.add_argument("--n_groups", type=plumbing.at_least(2), default=2, help="M, the number of groups (when the critic has no group head yet)")
parser.add_argument("--group_input", choices=["response", "prompt"], default="response", help="where the head reads: the last response token (p_φ(g|x,y)) or prompt token (p_φ(g|x))")
parser.add_argument("--fit_steps", type=plumbing.at_least(0), default=0, help="first fit φ here: Adam steps ascending R_var of the rewards (0: the head as saved)")
parser.add_argument("--min_group_frac", type=plumbing.at_least(0.0, float), default=1.0, help="n_min = this · B / M, the least size a group's mean divides by")
parser.add_argument("--lr", type=plumbing.at_least(0.0, float, above=True), default=1e-2, help="learning rate of the φ fit")
parser.add_argument("--max_len", type=plumbing.at_least(2), default=256, help="max tokens of prompt + response")
parser.add_argument("--seed", type=int, default=1, help="seed of a new group head")
# fmt: on


def read_rollouts(path):
    if not os.path.isfile(path):
        raise data.DataError(f"--rollouts {path}: no such file (ppo_gi.py writes OUT/rollouts.jsonl at its last iteration)")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                rows.append((row["prompt"], row["response"], float(row["reward"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise data.DataError(f"{path}, line {lineno}: expected JSON with prompt, response, reward ({e})") from None
    if not rows:
        raise data.DataError(f"{path}: no rollouts")
    return rows


def main(args):
    plumbing.check_model_dir(args.critic, "--critic", "score")
    rows = read_rollouts(args.rollouts)
    tokenizer = plumbing.load_tokenizer(args.critic)
    critic = groups.load_critic(args.critic, tokenizer, args.n_groups, seed=args.seed).eval()
    pieces = [plumbing.encode(tokenizer, p, r, max_len=args.max_len) for p, r, _ in rows]
    ids, mask = plumbing.pad_batch([p + r for p, r in pieces], tokenizer.pad_token_id)
    rewards = torch.tensor([r for _, _, r in rows])
    n_min = args.min_group_frac * len(rows) / args.n_groups
    at = torch.tensor([len(p) - 1 for p, _ in pieces]) if args.group_input == "prompt" else reward.last_token_index(mask)
    with torch.no_grad():
        _, hidden = reward.RewardModel.forward(critic, ids, mask, return_hidden=True)
        features = hidden[torch.arange(len(rows)), at]
    if args.fit_steps:  # Stage 1 alone: φ ascends R_var of the (fixed) rewards on frozen features
        optimizer = torch.optim.Adam(critic.group_head.parameters(), lr=args.lr)
        for _ in range(args.fit_steps):
            r_var = groups.variance_penalty(groups.group_returns(rewards, critic.group_head(features).softmax(-1), min_size=n_min))
            (-r_var).backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        probs = critic.group_head(features).softmax(-1)
    sizes, means = probs.sum(0), groups.group_returns(rewards, probs)
    print(f"{len(rows)} rollouts, M = {args.n_groups}, R_var of the reward = {groups.variance_penalty(means).item():.4f}")
    print(f"g_high = {groups.high_group(rewards, probs, min_size=n_min)}")
    for g in range(args.n_groups):
        print(f"group {g}: soft size {sizes[g].item():7.1f}   mean reward {means[g].item():+.3f}")
    truth = [toy.true_group(p) for p, _, _ in rows]
    if set(truth) != {"other"}:
        print("\nsoft share of each true group in each inferred group (rows: true group):")
        print(f"{'':12s}" + "".join(f"{'group ' + str(g):>10s}" for g in range(args.n_groups)) + f"{'mean gold':>11s}")
        by_true = collections.defaultdict(list)
        for i, t in enumerate(truth):
            by_true[t].append(i)
        for t, idx in sorted(by_true.items()):
            share = probs[idx].mean(0)
            gold = sum(toy.gold_score(rows[i][0], rows[i][1]) for i in idx) / len(idx)
            print(f"{t:12s}" + "".join(f"{s:10.2f}" for s in share.tolist()) + f"{gold:11.3f}")


if __name__ == "__main__":
    plumbing.run_main(main, parser)
