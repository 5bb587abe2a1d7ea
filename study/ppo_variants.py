"""study/ppo_variants.py: ppo_gi.py with the study's variants, through ppo_gi.main's two seams
(docs/METHOD.md, "Variants for the study"; RESULTS.md, "What carries the effect").

    --groups known        p(g|x): each prompt's group in the data, one-hot (M = the number of labels; φ takes no step)
    --group_input prompt  p_φ(g|x): the group head reads the last prompt token, so groups are groups of prompts
    --kl_weight rank      the KL weight q_i: the rank of the sample's score in its rollout batch, in [0, 1]

Every other flag is ppo_gi.py's, meaning the same:

    python study/ppo_variants.py --groups known --beta_policy 3 --kl_coef 0.5 --out runs/gi_known
    python study/ppo_variants.py --no_gi --kl_weight rank --kl_coef 0.5 --out runs/ppo_rank_kl
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import groups  # noqa: E402
import plumbing  # noqa: E402
import ppo_gi  # noqa: E402

parser = copy.deepcopy(ppo_gi.parser)  # ppo_gi.py's flags, its own parser left as it is
parser.prog, parser.description = "ppo_variants.py", __doc__.split("\n")[0]
parser.add_argument("--groups", choices=["inferred", "known"], default="inferred", help="p(g|·): the paper's φ, or the data's labels")
parser.add_argument("--group_input", choices=["response", "prompt"], default="response", help="what φ reads: p_φ(g|x,y) or p_φ(g|x)")
parser.add_argument("--kl_weight", choices=["group", "rank"], default="group", help="the KL weight: p_φ(g_high|x,y), or the score's rank")
parser.set_defaults(n_groups=None)  # M: 2 inferred groups, or the number of the data's labels


def rank_weights(scores, d):
    """q_i ∈ [0, 1]: the rank of each sample's score within the whole rollout batch (all ranks), 0 for
    the lowest and 1 for the highest; tied scores share their mean rank."""
    every = scores
    if d.sharded:
        parts = [torch.empty_like(scores) for _ in range(d.world)]
        torch.distributed.all_gather(parts, scores.contiguous())
        every = torch.cat(parts)
    below, ties = (every[None, :] < scores[:, None]).sum(-1), (every[None, :] == scores[:, None]).sum(-1)
    # q_i = (#{j: s_j < s_i} + (#{j: s_j = s_i} − 1)/2) / (N − 1)
    return (below + (ties - 1) / 2) / max(len(every) - 1, 1)


def rank_kl_weight(args, scores, probs, g_high, d):
    """The adaptive KL with the groups collapsed onto reward level: η·q_i in place of η·p_φ(g_high|x, y)."""
    return rank_weights(scores, d)


def prompt_group_probs(critic, ids, mask, P, groups_of):
    """p_φ(g|x): the group head at the last prompt token, so two responses to one prompt share it."""
    values, logits = critic(ids, mask, group_at=P - 1)
    return values, logits.softmax(-1)


def known_group_probs(names):
    """p(g|x): the one-hot of each prompt's data group, index in sorted `names` (the same on every rank);
    the adaptive KL as written then holds only g_high's samples to π^SFT."""
    def group_probs(critic, ids, mask, P, groups_of):
        labels = torch.tensor([names.index(g) for g in groups_of], device=ids.device)
        return critic(ids, mask)[0], torch.nn.functional.one_hot(labels, len(names)).float()
    group_probs.reads_phi = False  # φ takes no step
    return group_probs


def main(args):
    group_probs = prompt_group_probs if args.group_input == "prompt" else groups.p_phi
    if args.groups == "known":
        names = data.group_names(data.load_prompts(args.data, args.split, group_by=args.group_by, need_group=True))
        if len(names) < 2 and not args.no_gi:
            parser.error(f"--groups known: {args.data} [{args.split}] has one group label ({names[0]}); GI-PPO needs at least 2")
        if args.n_groups not in (None, len(names)):
            parser.error(f"--groups known: --n_groups {args.n_groups}, but the data has {len(names)} labels ({', '.join(names)})")
        group_probs, args.n_groups = known_group_probs(names), len(names)
        print("ppo_variants: known groups " + ", ".join(f"{g}={name}" for g, name in enumerate(names)))
    args.n_groups = args.n_groups or 2
    ppo_gi.main(args, group_probs=group_probs, kl_weight=rank_kl_weight if args.kl_weight == "rank" else ppo_gi.adaptive_kl_weight)


if __name__ == "__main__":
    plumbing.run_main(main, parser)
