"""study/ppo_variants.py: ppo_gi.py with the study's variants, through ppo_gi.main's seams
(docs/METHOD.md, "Variants for the study" and "Baselines users would pick instead"; RESULTS.md,
"What carries the effect" and "Which method stops the hack").

    --groups known          p(g|x): each prompt's group in the data, one-hot (M: the number of labels; φ takes no step)
    --group_input prompt    p_φ(g|x): the group head reads the last prompt token, so groups are groups of prompts
    --kl_weight rank        the KL weight q_i: the rank of the sample's score in its rollout batch, in [0, 1]
    --estimator rloo        RLOO (Ahmadian et al. 2024): --rloo_k samples per prompt, each one's advantage its
                            reward less the mean of the other k − 1; no value head (the critic is only φ's body)
    --ensemble uwo|wco      a reward-model ensemble (Coste et al. 2023): --reward and the --members, each
                            score normalized; UWO: mean − --uwo_lambda · variance; WCO: the worst member
    --par                   PAR (Fu et al. 2025): the reward σ(r(x, y) − r(x, y_ref)), y_ref the SFT policy's
                            greedy response to the prompt

Every other flag is ppo_gi.py's, meaning the same:

    python study/ppo_variants.py --groups known --beta_policy 3 --kl_coef 0.5 --out runs/gi_known
    python study/ppo_variants.py --no_gi --estimator rloo --rloo_k 4 --kl_coef 0.2 --out runs/rloo
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
import reward  # noqa: E402

parser = copy.deepcopy(ppo_gi.parser)  # ppo_gi.py's flags, its own parser left as it is
parser.prog, parser.description = "ppo_variants.py", __doc__.split("\n")[0]
parser.add_argument("--groups", choices=["inferred", "known"], default="inferred", help="p(g|·): the paper's φ, or the data's labels")
parser.add_argument("--group_input", choices=["response", "prompt"], default="response", help="what φ reads: p_φ(g|x,y) or p_φ(g|x)")
parser.add_argument("--kl_weight", choices=["group", "rank"], default="group", help="the KL weight: p_φ(g_high|x,y), or the score's rank")
parser.add_argument("--estimator", choices=["gae", "rloo"], default="gae", help="advantages: GAE over the critic's values, or RLOO")
parser.add_argument("--rloo_k", type=plumbing.at_least(2), default=4, help="RLOO: samples per prompt (--rollout_batch counts samples)")
parser.add_argument("--ensemble", choices=["none", "uwo", "wco"], default="none", help="an RM ensemble's reward: UWO or WCO")
parser.add_argument("--members", nargs="+", default=[], help="the ensemble's other reward models (--reward is the first)")
parser.add_argument("--uwo_lambda", type=plumbing.at_least(0.0, float), default=0.5, help="UWO: λ, the weight of the members' variance")
parser.add_argument("--par", action="store_true", help="PAR: the reward σ(r(x, y) − r(x, y_ref)), y_ref the SFT policy's greedy response")
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


def no_critic(n_groups):
    """RLOO without the group term reads neither values nor p(g|·): the critic network is not run (values 0,
    p uniform over the M groups, which only the group logs read)."""
    def group_probs(critic, ids, mask, P, groups_of):
        return torch.zeros(ids.shape, device=ids.device), torch.full((ids.shape[0], n_groups), 1.0 / n_groups, device=ids.device)
    group_probs.reads_phi = False  # φ takes no step
    return group_probs


class RLOO:
    """The RLOO estimator: k samples of each prompt side by side; no value head (the critic, if any, is φ's body)."""
    learns_values = False

    def __init__(self, k):
        self.samples_per_prompt = k

    def advantages(self, args, rewards, values, r_mask, d):
        k = self.samples_per_prompt
        # R_i = Σ_t r_t: the sample's score less its KL penalty
        R = rewards.sum(-1).view(-1, k)
        # A_i = R_i − (Σ_{j≠i} R_j) / (k − 1): the other k − 1 samples of its prompt as the baseline
        A = R - (R.sum(-1, keepdim=True) - R) / (k - 1)
        return A.view(-1, 1) * r_mask, R.view(-1, 1) * r_mask  # every token of the sample takes its advantage


def ensemble_scorer(members, mode, lam):
    """load_scorer for an RM ensemble: each member's score normalized by its training pairs' mean and std
    (reward_stats.json), then UWO (mean − λ·variance over the members) or WCO (their minimum)."""
    def load(spec, tokenizer, d, bf16):
        scorers = [reward.load_scorer(m, tokenizer, d, bf16) for m in [spec, *members]]

        def scorer(prompts, texts, ids, mask):
            r = torch.stack([(s(prompts, texts, ids, mask) - s.center) / s.std for s in scorers])  # [K, b]
            # UWO: r = mean_k r_k − λ·Var_k(r_k);  WCO: r = min_k r_k
            return r.mean(0) - lam * r.var(0, unbiased=False) if mode == "uwo" else r.min(0).values
        scorer.center = 0.0
        return scorer
    return load


def par_scorer(args):
    """load_scorer for PAR: σ(r(x, y) − r(x, y_ref)), y_ref the SFT policy's greedy response to x (each
    prompt's once, kept), r the reward model --reward."""
    def load(spec, tokenizer, d, bf16):
        # each rank its own copy (not sharded): the ranks' y_ref generations differ in number
        rm = reward.load_reward_model(spec, tokenizer, dtype=plumbing.frozen_dtype(d)).to(d.device).eval().requires_grad_(False)
        sft = plumbing.load_model(args.sft, tokenizer, dtype=plumbing.frozen_dtype(d)).to(d.device).eval()
        refs = {}

        def scorer(prompts, texts, ids, mask):
            new = list(dict.fromkeys(p for p in prompts if p not in refs))
            if new:
                refs.update(zip(new, plumbing.generate(sft, tokenizer, new, max_new_tokens=args.max_new_tokens, impl=args.generate_impl,
                                                       max_prompt_len=args.max_len - args.max_new_tokens)[3]))
            r_ref = reward.score(rm, tokenizer, prompts, [refs[p] for p in prompts], max_len=args.max_len).to(ids.device)
            # r_PAR = σ(r_ψ(x, y) − r_ψ(x, y_ref))
            return torch.sigmoid(reward.sequence_rewards(rm, ids, mask) - r_ref)
        scorer.center = 0.5
        return scorer
    return load


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
    if args.ensemble != "none" and args.par:
        parser.error("--ensemble and --par are two rewards: choose one")
    if args.ensemble != "none" and not args.members:
        parser.error(f"--ensemble {args.ensemble} needs --members: the other reward models (--reward is the first)")
    for m in args.members:
        plumbing.check_reward_dir(m, "--members")
    load_scorer = ensemble_scorer(args.members, args.ensemble, args.uwo_lambda) if args.ensemble != "none" else \
        par_scorer(args) if args.par else reward.load_scorer
    if args.estimator == "rloo" and args.no_gi:
        group_probs = no_critic(args.n_groups)
    ppo_gi.main(args, group_probs=group_probs, kl_weight=rank_kl_weight if args.kl_weight == "rank" else ppo_gi.adaptive_kl_weight,
                estimator=RLOO(args.rloo_k) if args.estimator == "rloo" else ppo_gi.GAE, load_scorer=load_scorer)


if __name__ == "__main__":
    plumbing.run_main(main, parser)
