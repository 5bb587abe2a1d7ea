"""PPO's machinery that is not the method (ppo_gi.py holds the method): the response mask, the scores'
shaping, whitening, back-propagating a minibatch in parts, and the per-iteration metrics."""
import math

import torch

from plumbing.processes import all_reduce_sum, global_min, group_means


def response_mask(resp, eos_id):
    """1 on every response token up to and including the first EOS, 0 after it (PPO_DETAILS 4)."""
    is_eos = (resp == eos_id).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


def masked_whiten(x, mask, d):
    """(x − mean)/std over valid tokens of all ranks (world-size invariant; PPO_DETAILS 10)."""
    stats = all_reduce_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]), d)
    mean = stats[0] / stats[2]
    var = stats[1] / stats[2] - mean ** 2
    return (x - mean) * torch.rsqrt(var.clamp(min=1e-8)) * mask


def shape_scores(args, d, centered, has_eos, running, it):
    """PPO's step 2 on the centred scores [b]: divide by the running std (PPO_DETAILS 8), clip
    (--reward_clip), put a response with no EOS below every finished one (--no_eos_margin;
    PPO_DETAILS 5), and for the no-signal control (--shuffle_rewards) shuffle them on this rank."""
    running.update(centered, d)
    scores = centered / running.std
    if args.reward_clip:
        scores = scores.clamp(-args.reward_clip, args.reward_clip)
    lowest_finished = global_min(torch.where(has_eos, scores, torch.full_like(scores, math.inf)), d)
    if not math.isfinite(lowest_finished):  # no response in the batch finished
        lowest_finished = global_min(scores, d)
    scores = torch.where(has_eos, scores, torch.full_like(scores, lowest_finished - args.no_eos_margin))
    if args.shuffle_rewards:
        shuffle = torch.Generator().manual_seed(args.seed * 100003 + it * d.world + d.rank + 7919)
        scores = scores[torch.randperm(len(scores), generator=shuffle).to(scores.device)]
    return scores


def pick(batch, rows, keys=None):
    """The rows `rows` of a batch (None: all of it, itself) of tensors and lists, its `keys` only if given."""
    keys = keys or batch.keys()
    if rows is None:
        return {k: batch[k] for k in keys}
    return {k: [batch[k][i] for i in rows] if isinstance(batch[k], list) else batch[k][rows] for k in keys}


def backward_in_parts(loss_of, n_rows, d, grad_accum):
    """Back-propagate one global minibatch in --grad_accum micro-batches of this rank's `n_rows` rows:
    loss_of(rows) is the whole minibatch's loss with only `rows` live (None: all), so the parts'
    gradients add up to the whole's; × world undoes FSDP2's average over ranks. Returns the summed loss."""
    total = 0.0
    for rows in [None] if grad_accum == 1 else list(torch.arange(n_rows).chunk(grad_accum)):
        loss = loss_of(rows)
        (loss * d.world).backward()
        total = total + loss.detach()
    return total


def policy_stats(pg_loss, n_tok, new_logp, old_logp, ratio, ent, r_mask, cliprange):
    """The θ step's token sums for the logs (log_update divides them by the minibatch's tokens)."""
    with torch.no_grad():
        return {"policy/loss": pg_loss * n_tok, "policy/entropy": (ent * r_mask).sum(),
                "policy/approxkl": (0.5 * (new_logp - old_logp) ** 2 * r_mask).sum(),
                "policy/clipfrac": (((ratio - 1).abs() > cliprange).float() * r_mask).sum()}


def critic_stats(vf_loss, n_tok, v, old_v, r_mask, cliprange_value):
    """The critic step's token sums for the logs."""
    with torch.no_grad():
        return {"val/loss": vf_loss * n_tok, "val/clipfrac": (((v - old_v).abs() > cliprange_value).float() * r_mask).sum()}


def log_update(log_stats, sums, n_tok, d, values):
    """Append one minibatch's means over its tokens (all ranks) and `values` ({name: 0-d tensor}) to log_stats."""
    names = sorted(sums)
    means = all_reduce_sum(torch.stack([sums[k] for k in names]).float(), d) / n_tok
    for name, value in [*zip(names, means.tolist()), *((k, v.item()) for k, v in values.items())]:
        log_stats.setdefault(name, []).append(value)


def iteration_metrics(args, d, batch, stats, running, all_groups=()):
    """PPO diagnostics (names as in TRL / the N+ details) plus groups/* for this method (PPO_DETAILS 17)."""
    r_mask = batch["r_mask"]
    seq_kl = (batch["kl"] * r_mask).sum(-1)
    rows = torch.stack([torch.ones_like(seq_kl), seq_kl, batch["raw"], batch["scores"] - args.kl_coef * batch["p_high"] * seq_kl,
                        batch["has_eos"].to(seq_kl.device), batch["p_high"], args.kl_coef * batch["p_high"]], -1)
    tot = all_reduce_sum(rows.sum(0), d)
    names = ["objective/kl", "objective/scores", "objective/rlhf_reward", "num_eos", "groups/p_high_mean", "groups/kl_weight"]
    m = {k: (v / tot[0]).item() for k, v in zip(names, tot[1:])}
    ret, val = batch["returns"], batch["values"]
    ev = all_reduce_sum(torch.stack([((ret - val) * r_mask).sum(), ((ret - val) ** 2 * r_mask).sum(),
                                              (ret * r_mask).sum(), (ret ** 2 * r_mask).sum(), r_mask.sum()]), d)
    var_err, var_ret = ev[1] / ev[4] - (ev[0] / ev[4]) ** 2, ev[3] / ev[4] - (ev[2] / ev[4]) ** 2
    m["val/explained_variance"] = (1 - var_err / var_ret.clamp(min=1e-8)).item()
    m.update({k: sum(v) / len(v) for k, v in stats.items() if isinstance(v, list)})
    m["train/skipped"], m["objective/running_std"] = stats.get("skipped", 0), running.std
    # groups/*: each inferred group's soft size, mean score and mean return (the sequence return at t = 0)
    probs = batch["probs"]
    sums = all_reduce_sum(torch.cat([probs.sum(0), (probs * batch["scores"][:, None]).sum(0), (probs * ret[:, 0:1]).sum(0)]), d)
    for g, (size, score, ret_g) in enumerate(sums.view(3, -1).T.tolist()):
        m.update({f"groups/size_{g}": size, f"groups/score_{g}": score / max(size, 1e-8), f"groups/return_{g}": ret_g / max(size, 1e-8)})
    m["groups/g_high"] = batch["g_high"]
    if all_groups:  # the KL per group of the data: where the adaptive KL holds the policy, and where it lets go
        m.update(group_means("kl", seq_kl.tolist(), batch["groups"], all_groups, d))
    if batch["judged"] is not None:  # --judge_reward: the watching reward model, per group of the data
        m.update(group_means("judge", batch["judged"].tolist(), batch["groups"], all_groups, d))
    return m
