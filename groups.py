"""groups.py: Stage 1 of the method, group label inference.

A classifier p_φ(g | x, y) over M groups (a linear head on the critic's last-token hidden state,
softmax over M) is trained to MAXIMIZE the variance of performance across the groups it infers:

    R_g(θ)      = Σ_i p_φ(g|x_i,y_i) · J_i  /  Σ_i p_φ(g|x_i,y_i)          (soft group mean)
    R_var(θ, φ) = Var( R_g1(θ), R_g2(θ), …, R_gM(θ) )                      (population variance)

What J_i is (docs/METHOD.md, "The per-trajectory term J_i"): R_g(θ) is group g's expected return,
so J_i's *value* is trajectory i's scalar return G_i, and its θ-*gradient* is a policy gradient.
Through group_returns and variance_penalty the chain rule then gives Stage 2's term as a weight
per trajectory (tests/test_ppo_gi.py checks it against the weights derived by hand):

    ∇_θ R_var = Σ_g ∂R_var/∂R_g · ∇_θ R_g = Σ_i w_i · ∇_θ S_i,   w_i = ∂R_var/∂G_i

with S_i(θ) trajectory i's policy-gradient surrogate (ppo_gi.py). This treats p_φ as fixed per
trajectory: exact when the groups are a function of the prompt, an approximation when p_φ also
reads the response (as the critic's head does). The slide-literal reading,
J_i = Σ_t log π_θ(a_t|s_t)·R_t taken as a value, stays available as `ppo_gi.py --j_form slide`.

With hard 0/1 probabilities R_g is the slide's indicator form. Soft probabilities replace the
indicator (as in EIIL); normalizing by the soft group size (not by N) keeps φ from winning by
putting every positive J_i in one group. It does not stop φ from isolating a single extreme sample:
a near-empty group whose mean is the batch's largest J_i maximizes the variance, and p_φ(g_high)
then collapses. Our remedy (not in the paper; `--min_group_frac`, 0 turns it off): a group counts
at least n_min = min_group_frac · B / M samples in the denominator (default 1, its fair share).
A small group's R_g is then its sum over n_min, which grows as more same-signed samples join it,
so φ gains more by splitting the batch than by isolating an outlier. Stage 2 (ppo_gi.py) trains the
policy to minimize R_var.

Standalone: infer the groups of saved rollouts (ppo_gi.py writes OUT/rollouts.jsonl) with the
critic's group head, and print each group's soft size, mean reward and, on the built-in task, how
the inferred groups line up with the true ones (the slide: "our method can identify simple and
difficult groups"):

    python groups.py --rollouts runs/gi_ppo/rollouts.jsonl --critic runs/gi_ppo/critic
    python groups.py --rollouts runs/ppo/rollouts.jsonl --critic runs/reward --fit_steps 200   # fit φ here
"""
import argparse
import collections
import json
import os

import torch

import data
import plumbing
import reward

# fmt: off
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--rollouts", default="runs/gi_ppo/rollouts.jsonl", help="JSONL of {prompt, response, reward} (ppo_gi.py writes one)")
parser.add_argument("--critic", default="runs/gi_ppo/critic", help="critic directory (with its group head) or a reward model directory")
parser.add_argument("--n_groups", type=plumbing.at_least(2), default=2, help="M, the number of groups (when the critic has no group head yet)")
parser.add_argument("--group_input", choices=["response", "prompt"], default="response", help="where the head reads the critic: the last response token (p_φ(g|x,y)) or the last prompt token (p_φ(g|x)), as ppo_gi.py --group_input")
parser.add_argument("--fit_steps", type=plumbing.at_least(0), default=0, help="first fit φ here: Adam steps maximizing R_var of the rewards (0: use the head as saved)")
parser.add_argument("--min_group_frac", type=plumbing.at_least(0.0, float), default=1.0, help="n_min = this · B / M: the least soft size a group's mean is divided by (0: the raw soft mean)")
parser.add_argument("--lr", type=plumbing.at_least(0.0, float, above=True), default=1e-2, help="learning rate of the φ fit")
parser.add_argument("--max_len", type=plumbing.at_least(2), default=256, help="max tokens of prompt + response")
parser.add_argument("--seed", type=int, default=1, help="seed of a new group head")
# fmt: on


def group_returns(per_traj, probs, reduce=None, min_size=0.0, eps=1e-8):
    """R_g for each group: soft-weighted mean of the per-trajectory terms. per_traj [B], probs [B, M] → [M].
    `reduce` sums the two group sums over ranks, so the means span the whole global batch.
    `min_size` n_min: a group smaller than n_min is divided by n_min instead (see below)."""
    weighted, size = (probs * per_traj[:, None]).sum(0), probs.sum(0)
    if reduce is not None:
        weighted, size = reduce(weighted), reduce(size)
    # R_g = Σ_i p_φ(g|x_i,y_i)·J_i / max(Σ_i' p_φ(g|x_i',y_i'), n_min)
    return weighted / (size.clamp(min=min_size) + eps)


def variance_penalty(group_returns):
    """R_var: the population variance of the M group values (mean squared deviation from their mean)."""
    # R_var(θ, φ) = Var(R_g1(θ), …, R_gM(θ))
    return ((group_returns - group_returns.mean()) ** 2).mean()


class Critic(reward.RewardModel):
    """The reward model's backbone and head as the value function V(s_t) (one scalar per token),
    plus the group classifier p_φ(g|x, y): a linear head on the last real token's hidden state."""

    def __init__(self, hf, n_groups):
        super().__init__(hf)
        self.group_head = torch.nn.Linear(hf.config.hidden_size, n_groups)

    def forward(self, ids, mask, group_at=None):
        """V [B, T] and the group logits [B, M], read at the last real token (p_φ(g|x, y)), or at
        column `group_at` (an int or one index per row), e.g. the last prompt token (p_φ(g|x))."""
        values, hidden = super().forward(ids, mask, return_hidden=True)
        at = reward.last_token_index(mask) if group_at is None else group_at
        return values, self.group_head(hidden[torch.arange(ids.shape[0], device=ids.device), at]).float()


def group_probs(args, critic, ids, mask, P, labels):
    """The critic's values [b, T] and p(g|x, y) [b, M]: the one-hot of the known labels (ppo_gi.py
    --groups known), or p_φ from the critic's group head, read at the last response token (the
    paper's p_φ(g|x, y)) or at the last prompt token P − 1 (--group_input prompt: p_φ(g|x))."""
    values, group_logits = critic(ids, mask, group_at=P - 1 if args.group_input == "prompt" else None)
    if args.groups == "known":
        return values, torch.nn.functional.one_hot(labels, args.n_groups).float()
    return values, group_logits.softmax(-1)


def load_critic(path, tokenizer, n_groups, seed=0):
    """Critic from a reward model directory (new group head) or a saved critic (its head reloaded)."""
    critic = Critic(plumbing.load_model(path, tokenizer, seed=seed, head="score"), n_groups)
    heads = os.path.join(path, "extra_heads.pt")
    if os.path.exists(heads):
        state = torch.load(heads, weights_only=True)
        if state["group_head.weight"].shape[0] != n_groups:
            raise ValueError(f"{heads}: the group head has {state['group_head.weight'].shape[0]} groups, --n_groups is {n_groups}")
        critic.group_head.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("group_head.")})
    else:
        torch.manual_seed(seed)
        critic.group_head.reset_parameters()
    return critic


def centered(values, reduce=None):
    """values − their mean over the global batch (`reduce` sums over ranks). With the floor n_min a
    small group's mean is pulled towards 0; centring makes that the batch mean, so R_g, R_var and
    the weights w_i do not depend on where zero is on the reward scale."""
    total = torch.stack([values.detach().sum(), values.new_tensor(float(values.shape[0]))])
    if reduce is not None:
        total = reduce(total)
    return values - total[0] / total[1]


def high_group(rewards, probs, reduce=None, min_size=0.0):
    """g_high: the group whose soft mean of the scalar reward is highest, recomputed every batch."""
    return int(group_returns(centered(rewards, reduce), probs, reduce, min_size).argmax())


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
    critic = load_critic(args.critic, tokenizer, args.n_groups, seed=args.seed).eval()
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
            r_var = variance_penalty(group_returns(rewards, critic.group_head(features).softmax(-1), min_size=n_min))
            (-r_var).backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        probs = critic.group_head(features).softmax(-1)
    sizes, means = probs.sum(0), group_returns(rewards, probs)
    print(f"{len(rows)} rollouts, M = {args.n_groups}, R_var of the reward = {variance_penalty(means).item():.4f}")
    print(f"g_high = {high_group(rewards, probs, min_size=n_min)}")
    for g in range(args.n_groups):
        print(f"group {g}: soft size {sizes[g].item():7.1f}   mean reward {means[g].item():+.3f}")
    truth = [data.true_group(p) for p, _, _ in rows]
    if set(truth) != {"other"}:
        print("\nsoft share of each true group in each inferred group (rows: true group):")
        print(f"{'':12s}" + "".join(f"{'group ' + str(g):>10s}" for g in range(args.n_groups)) + f"{'mean gold':>11s}")
        by_true = collections.defaultdict(list)
        for i, t in enumerate(truth):
            by_true[t].append(i)
        for t, idx in sorted(by_true.items()):
            share = probs[idx].mean(0)
            gold = sum(data.gold_score(rows[i][0], rows[i][1]) for i in idx) / len(idx)
            print(f"{t:12s}" + "".join(f"{s:10.2f}" for s in share.tolist()) + f"{gold:11.3f}")


if __name__ == "__main__":
    plumbing.run_main(main, parser)
