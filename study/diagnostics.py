"""study/diagnostics.py: what the group term does to one θ step, measured on a rollout (each costs a
backward pass the training loop does not take):

    grad_cos         the cosine between the θ-gradients of the PPO term and of β_policy·R_var
    weight_abs_mean  B·mean|w_i|, w_i = ∂R_var/∂J_i: how strongly the group term re-weights trajectory i
                     against the PPO term's 1/B (where β_policy·B·|w_i| > 1 it reverses a trajectory's update)

One rollout of --rollout_batch prompts from --policy (default: --sft) under ppo_gi.py's flags, its first
global minibatch measured; torchrun measures the sharded step.

    python study/diagnostics.py --sft runs/sft --reward runs/reward --policy runs/gi_ppo --beta_policy 0.1
"""
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import groups  # noqa: E402
import plumbing  # noqa: E402
import ppo_gi  # noqa: E402
import reward  # noqa: E402

parser = copy.deepcopy(ppo_gi.parser)  # ppo_gi.py's flags, its own parser left as it is
parser.prog, parser.description = "diagnostics.py", __doc__.split("\n")[0]
parser.add_argument("--policy", default=None, help="the policy to measure (a ppo_gi.py run's folder; default: --sft)")
parser.add_argument("--critic", default=None, help="its critic, for p_φ (default: --policy's critic/, else --reward)")


def theta_gradients(args, d, policy, batch):
    """{groups/grad_cos, groups/weight_abs_mean} on the rollout's first global minibatch; .grad left empty."""
    idx = torch.arange(batch["ids"].shape[0]).chunk(args.rollout_batch // args.minibatch)[0]
    mb = {k: batch[k][idx] for k in ("ids", "mask", "r_mask", "advantages", "logp", "probs", "returns", "seq_returns")}
    reduce = lambda x: plumbing.sum_over_ranks(x, d)  # noqa: E731
    n_tok = plumbing.all_reduce_sum(mb["r_mask"].sum().clone(), d)
    G = groups.centered(mb["seq_returns"], reduce)
    new_logp, _ = plumbing.response_logprobs(policy, mb["ids"], mb["mask"], batch["P"], args.temperature)
    pg_loss, r_var, J, _ = ppo_gi.policy_loss(new_logp, mb["logp"], mb["advantages"], mb["returns"], mb["r_mask"], G, mb["probs"],
                                              n_tok=n_tok, minibatch=args.minibatch, cliprange=args.cliprange,
                                              n_min=args.min_group_frac * args.minibatch / args.n_groups, j_form=args.j_form, reduce=reduce)
    w = torch.autograd.grad(r_var, J, retain_graph=True)[0]  # w_i = ∂R_var/∂J_i, this rank's rows
    cosine = plumbing.gradient_cosine(policy, pg_loss * d.world, args.beta_policy * r_var * d.world, d)
    policy.zero_grad(set_to_none=True)
    w_abs = plumbing.all_reduce_sum(torch.stack([w.abs().sum(), torch.ones_like(w).sum()]), d)
    return {"groups/grad_cos": cosine, "groups/weight_abs_mean": (w_abs[0] / w_abs[1] * args.minibatch).item()}


def main(args):
    d = plumbing.init_distributed()
    plumbing.seed_everything(args.seed)
    policy_dir = args.policy or args.sft
    tokenizer = plumbing.load_tokenizer(args.sft)
    critic_dir = args.critic or (os.path.join(policy_dir, "critic") if args.policy else (args.sft if args.reward == "gold" else args.reward))
    policy, reference = plumbing.load_model(policy_dir, tokenizer), plumbing.load_model(args.sft, tokenizer)
    critic = groups.load_critic(critic_dir, tokenizer, args.n_groups, seed=args.seed)
    for model in (policy, reference, critic):
        plumbing.shard(model.eval(), d)
    records = data.load_prompts(args.data, args.split, group_by=args.group_by)
    mine = plumbing.batch_indices(0, args.rollout_batch, len(records), args.seed)[d.rank::d.world]
    batch = ppo_gi.rollout(args, d, policy, reference, critic, reward.load_scorer(args.reward, tokenizer, d, False), tokenizer,
                           [records[i]["prompt"] for i in mine], 0, ppo_gi.RunningStd(), groups_of=[records[i].get("group") for i in mine])
    out = theta_gradients(args, d, policy, batch)
    if d.main:
        print(json.dumps(out))
    plumbing.close_distributed(d)


if __name__ == "__main__":
    plumbing.run_main(main, parser)
