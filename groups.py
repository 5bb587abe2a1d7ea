"""groups.py: Stage 1 of the method, group label inference (docs/METHOD.md, "The slide equations").

A classifier p_φ(g|x, y) over M groups, a linear head on the critic's hidden state, is trained to
MAXIMIZE the variance of performance across the groups it infers; Stage 2 (ppo_gi.py) trains the
policy to minimize it. Soft probabilities replace the slide's indicator (as in EIIL); a group's
mean divides by its soft size, floored at n_min, so that φ can neither win by putting every positive
term in one group nor by isolating one outlier (docs/METHOD.md, "Soft group means and the floor").
What the per-trajectory term J_i is, value and gradient: docs/METHOD.md, "The per-trajectory term J_i".
study/inspect_groups.py lines the inferred groups up with the true ones on saved rollouts.
"""
import os

import torch

import plumbing
import reward


def group_returns(J, probs, reduce=None, min_size=0.0, eps=1e-8):
    """R_g for each group: the soft-weighted mean of the per-trajectory terms. J [B], probs [B, M] → [M].
    `reduce` sums the two group sums over ranks, so the means span the whole global batch."""
    weighted, size = (probs * J[:, None]).sum(0), probs.sum(0)
    if reduce is not None:
        weighted, size = reduce(weighted), reduce(size)
    # R_g(θ) = Σ_i p_φ(g|x_i,y_i)·J_i / max(Σ_i p_φ(g|x_i,y_i), n_min)
    return weighted / (size.clamp(min=min_size) + eps)


def variance_penalty(group_returns):
    """R_var: the population variance of the M group values (mean squared deviation from their mean)."""
    # R_var(θ, φ) = Var(R_g1(θ), …, R_gM(θ))
    return ((group_returns - group_returns.mean()) ** 2).mean()


def centered(values, reduce=None):
    """values − their mean over the global batch (`reduce` sums over ranks). The floor n_min pulls a
    small group's mean towards 0; centring makes that the batch mean, so R_g, R_var and the weights
    w_i do not depend on where zero is on the reward scale."""
    total = torch.stack([values.detach().sum(), values.new_tensor(float(values.shape[0]))])
    if reduce is not None:
        total = reduce(total)
    return values - total[0] / total[1]


def high_group(scores, probs, reduce=None, min_size=0.0):
    """g_high: the group whose soft mean of the scalar score is highest, recomputed every batch."""
    # g_high = argmax_g R_g(score)
    return int(group_returns(centered(scores, reduce), probs, reduce, min_size).argmax())


class Critic(reward.RewardModel):
    """The reward model's backbone and head as the value function V(s_t) (one scalar per token), plus
    the group classifier φ: a linear head on the hidden state, M logits."""

    def __init__(self, hf, n_groups):
        super().__init__(hf)
        self.group_head = torch.nn.Linear(hf.config.hidden_size, n_groups)

    def forward(self, ids, mask, group_at=None):
        """V [B, T] and the group logits [B, M], read at the last real token, or at column `group_at`
        (an int or one index per row; study/ppo_variants.py reads the last prompt token)."""
        values, hidden = super().forward(ids, mask, return_hidden=True)
        at = reward.last_token_index(mask) if group_at is None else group_at
        return values, self.group_head(hidden[torch.arange(ids.shape[0], device=ids.device), at]).float()


def p_phi(critic, ids, mask, P, groups=None):
    """The critic's values V [b, T] and p_φ(g|x, y) [b, M], the group head at the last response token
    (P: the prompts' padded length; groups: each row's data group, which the paper's φ does not read)."""
    values, logits = critic(ids, mask)
    # p_φ(g|x, y) = softmax_g(φ(h(x, y)))
    return values, logits.softmax(-1)


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
