"""ppo_gi.py: Stage 2 of the method, the group invariant policy gradient and the adaptive KL, on PPO.

docs/METHOD.md maps each slide equation to the line here that computes it; docs/PPO_DETAILS.md the
PPO details ("PPO_DETAILS n"). Each iteration, as the algorithm box numbers it: 1. sample responses
from π_θ; 2. score them with r_ψ; 3. log π_old, log π^SFT, V and p_φ(g|x,y); 4. token rewards with
the adaptive KL; 5. GAE; 6. PPO epochs: θ descends the clipped surrogate + β_policy·R_var (φ fixed),
the critic descends its value loss − β_critic·R_var (φ ascends R_var, θ's terms fixed).
The paper's baselines and ablations: --no_gi (PPO w/ KL), --no_gi --kl_coef 0 (PPO), --fixed_kl,
--beta_policy 0; --shuffle_rewards is the no-signal control. The study's variants (other groups, KL
weights, advantage estimators, rewards) are study/ppo_variants.py, through main's seams.

    python ppo_gi.py                                   # GI-PPO on the built-in task, 1 process
    torchrun --nproc_per_node 8 ppo_gi.py --sft runs/sft-7b --reward runs/rm-7b --data Anthropic/hh-rlhf \\
        --lr 5e-7 --critic_lr 1.5e-6 --rollout_batch 512 --batch_size 64 --max_new_tokens 256 --max_len 768
"""
import argparse
import collections
import os
import time

import torch

import data
import groups
import plumbing
import reward
import toy

count, rate, positive = plumbing.at_least(1), plumbing.at_least(0.0, float), plumbing.at_least(0.0, float, above=True)
# flags that --resume may change: how long, how often to log, evaluate or save; none changes the model, the data or a shape
MAY_CHANGE_ON_RESUME = {"steps", "stop_at", "resume", "save_every", "log_every", "eval_prompts", "eval_split", "max_skipped",
                        "keep_checkpoints", "report_to", "sample_every", "judge_reward"}
# fmt: off
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--sft", default="runs/sft", help="SFT directory: the initial policy and the frozen reference π^SFT")
parser.add_argument("--reward", default="runs/reward", help="reward model directory (also the critic's start), or 'gold' (the toy judge)")
parser.add_argument("--data", default="toy", help="data.py spec of prompts")
parser.add_argument("--split", default="rl", help="prompt split (real data: data.py carves train / rl / judge / test)")
parser.add_argument("--group_by", choices=["harm"], default=None, help="HH-RLHF: fold the four subsets into harmless / helpful")
parser.add_argument("--eval_split", default="test", help="toy: the split of the greedy gold evaluation at the end")
parser.add_argument("--out", default="runs/gi_ppo", help="output directory")
parser.add_argument("--steps", type=count, default=60, help="PPO iterations (rollout + update)")
parser.add_argument("--rollout_batch", type=count, default=64, help="rollouts per iteration, all ranks together (one per prompt unless the estimator samples several)")
parser.add_argument("--batch_size", "--minibatch", dest="minibatch", type=count, default=64, help="samples per update, all ranks together")
parser.add_argument("--grad_accum", type=count, default=1, help="micro-batches per rank per update (the same update in less memory)")
parser.add_argument("--forward_batch", type=plumbing.at_least(0), default=0, help="rows per scoring forward pass (0: a rank's rollout)")
parser.add_argument("--ppo_epochs", type=count, default=1, help="passes over each rollout (MOSS-RLHF: 1)")
parser.add_argument("--max_new_tokens", type=count, default=24, help="response length limit")
parser.add_argument("--min_new_tokens", type=plumbing.at_least(0), default=0, help="suppress EOS before this many tokens (benchmarks)")
parser.add_argument("--max_len", type=plumbing.at_least(2), default=152, help="max tokens of prompt + response (prompts cut from the left)")
parser.add_argument("--temperature", type=positive, default=1.0, help="sampling temperature; log-probs are taken at the same T")
parser.add_argument("--lr", type=rate, default=2e-5, help="policy learning rate")
parser.add_argument("--critic_lr", type=rate, default=3e-4, help="critic and group head learning rate")
parser.add_argument("--warmup", type=plumbing.at_least(0), default=0, help="iterations of linear learning-rate warm-up (policy and critic)")
parser.add_argument("--decay", choices=["none", "cosine"], default="none", help="after the warm-up: constant, or a cosine to 10%% at the end")
parser.add_argument("--kl_coef", type=rate, default=0.05, help="η: the KL penalty coefficient (0: PPO without KL)")
parser.add_argument("--kl_estimator", choices=["k1", "k3"], default="k1", help="per-token KL estimate penalized and logged")
parser.add_argument("--beta_policy", type=rate, default=0.5, help="β_policy: the weight of R_var in the policy loss")
parser.add_argument("--beta_critic", type=rate, default=1.0, help="β_critic: the weight of R_var / Var(G) (maximized) in the critic loss")
parser.add_argument("--n_groups", type=count, default=2, help="M, the number of inferred groups")
parser.add_argument("--min_group_frac", type=rate, default=1.0, help="n_min = this · batch / M, the least size a group mean divides by")
parser.add_argument("--j_form", choices=["derived", "slide"], default="derived", help="J_i in R_g: the chain rule's, or the slide's literal value")
parser.add_argument("--no_gi", action="store_true", help="plain PPO w/ KL: no group invariant term, p_high ≡ 1")
parser.add_argument("--fixed_kl", action="store_true", help="group invariance without the adaptive KL (p_high ≡ 1)")
parser.add_argument("--gamma", type=plumbing.fraction, default=1.0, help="GAE γ")
parser.add_argument("--lam", type=plumbing.fraction, default=0.95, help="GAE λ")
parser.add_argument("--cliprange", type=positive, default=0.2, help="PPO ratio clip ε")
parser.add_argument("--cliprange_value", type=positive, default=0.2, help="value clip")
parser.add_argument("--whiten_advantages", type=int, choices=[0, 1], default=1, help="whiten advantages over the rollout's tokens")
parser.add_argument("--no_eos_margin", type=rate, default=1.0, help="a response with no EOS scores this far below the lowest finished one")
parser.add_argument("--shuffle_rewards", action="store_true", help="the no-signal control: permute the scores within each rollout")
parser.add_argument("--reward_clip", type=rate, default=0.0, help="clip the scaled score to ±this (0: off)")
parser.add_argument("--eval_prompts", type=plumbing.at_least(0), default=200, help="toy: greedy gold on this many --eval_split prompts")
parser.add_argument("--judge_reward", default=None, help="a reward model that only watches: its scores logged as judge/*")
parser.add_argument("--sample_every", type=plumbing.at_least(0), default=0, help="every K iterations, log a table of samples (0: never)")
parser.add_argument("--report_to", choices=["none", "tensorboard"], default="none", help="also log to TensorBoard (OUT/tensorboard)")
parser.add_argument("--gradient_checkpointing", type=int, choices=[0, 1], default=0, help="1: recompute each block in the backward pass")
parser.add_argument("--keep_checkpoints", type=count, default=1, help="keep the newest K checkpoints in OUT/checkpoints")
parser.add_argument("--save_every", type=plumbing.at_least(0), default=20, help="checkpoint every K iterations (0: never)")
parser.add_argument("--stop_at", type=count, default=None, help="stop after this iteration as if interrupted (for resume tests)")
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
parser.add_argument("--max_skipped", type=plumbing.fraction, default=0.1, help="fail (exit 1, nothing saved) past this share of skipped updates")
parser.add_argument("--seed", type=int, default=1, help="seed for data order and sampling")
parser.add_argument("--bf16", type=int, default=None, help="bf16 autocast compute, fp32 weights (default: on under CUDA only)")
parser.add_argument("--generate_cache", choices=plumbing.CACHE_KINDS, default=None, help="rollout KV cache (default: the device's)")
parser.add_argument("--generate_impl", choices=plumbing.GENERATE_IMPLS, default=None, help="rollout sampler: loop (ours) or hf")
parser.add_argument("--log_every", type=count, default=1, help="metrics every K iterations")
# fmt: on


# ----------------------------------------------------------------------------------------------
# The algorithm: pure functions, each line under the equation it computes
# ----------------------------------------------------------------------------------------------
def kl_per_token(logp, ref_logp, estimator="k1"):
    """Per-token estimate of KL(π_θ || π^SFT) on the sampled tokens (PPO_DETAILS 7)."""
    if estimator == "k1":
        return logp - ref_logp  # unbiased, can be negative per sample
    log_ratio = ref_logp - logp
    return log_ratio.exp() - 1 - log_ratio  # k3 = (ratio − 1) − log ratio, ratio = π^SFT/π_θ, ≥ 0


def adaptive_kl_weight(args, scores, probs, g_high, d):
    """The per-sample weight of the KL penalty: p_φ(g_high|x, y), the paper's adaptive KL; 1 for PPO
    w/ KL (--no_gi) and the fixed-KL ablation. A seam: study/ppo_variants.py passes main another."""
    if args.no_gi or args.fixed_kl:
        return torch.ones_like(scores)
    # p_high = p_φ(g_high|x, y)
    return probs[:, g_high]


def adaptive_kl_rewards(scores, kl, mask, p_high, eta):
    """Token rewards: −η·p_high·KL_t on every response token, plus the score on the last real
    response token (the EOS if the response has one; PPO_DETAILS 6)."""
    # r_total = r_ψ(x, y) − η · p_φ(g_high|x, y) · KL(π_θ^RL(y|x) || π^SFT(y|x))
    rewards = -eta * p_high[:, None] * kl * mask
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over [B, T] tensors; mask is 1 on response tokens (a prefix
    of each row). The value after the last response token is 0. Returns (A, A + V)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        # δ_t = r_t + γ·V(s_{t+1}) − V(s_t)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # A_t = δ_t + γλ·A_{t+1}
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


class GAE:
    """The advantage estimator, a seam (study/ppo_variants.py passes RLOO's): GAE over the critic's
    values, one sample per prompt, the value head trained; advantages whitened (PPO_DETAILS 10)."""
    samples_per_prompt, learns_values = 1, True

    @staticmethod
    def advantages(args, rewards, values, r_mask, d):
        advantages, returns = gae(rewards, values, r_mask, args.gamma, args.lam)
        return plumbing.masked_whiten(advantages, r_mask, d) if args.whiten_advantages else advantages, returns


def per_trajectory_terms(j_form, G, pg_per_token, n_tok, minibatch, new_logp, returns, r_mask):
    """J_i [b], the per-trajectory term inside R_g(θ) for the θ step (docs/METHOD.md, "The per-trajectory term J_i")."""
    if j_form == "derived":
        # S_i(θ): trajectory i's clipped surrogate, scaled so that its minibatch mean is −pg_loss
        S = -pg_per_token.sum(-1) * minibatch / n_tok
        # J_i = G_i + S_i − stopgrad(S_i): value G_i (the return), gradient ∇_θ S_i, so that
        #   ∇_θ R_var = Σ_g ∂R_var/∂R_g · ∇_θ R_g = Σ_i w_i · ∇_θ S_i,   w_i = ∂R_var/∂G_i
        return G.detach() + S - S.detach()
    # --j_form slide: J_i = Σ_t log π_θ(a_t|s_t) · R_t  (R_t: the GAE return, detached)
    return (new_logp * returns * r_mask).sum(-1)


def policy_loss(new_logp, old_logp, adv, returns, r_mask, G, probs, rows=None, *, n_tok, minibatch, cliprange, n_min,
                j_form="derived", reduce=None):
    """θ's two terms on one global minibatch of n_tok response tokens (PPO_DETAILS 11): the clipped
    surrogate, a per-token mean, and R_var(θ, φ) of the terms J_i, p(g|x, y) fixed (`probs`, detached).
    The first five tensors are the live rows (`rows` of G and probs; None: all): the other rows enter
    R_var at their value G_i, so the parts' gradients add up to the whole's. Returns (pg_loss, r_var, J, ratio)."""
    ratio = (new_logp - old_logp).exp()
    # L^CLIP(θ) = E_t[max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))],  ρ_t = π_θ(a_t|s_t) / π_θold(a_t|s_t)
    pg_per_token = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)) * r_mask
    pg_loss = pg_per_token.sum() / n_tok
    J = per_trajectory_terms(j_form, G if rows is None else G[rows], pg_per_token, n_tok, minibatch, new_logp, returns, r_mask)
    J = J if rows is None else G.detach().index_put((rows,), J)
    # R_g(θ) = Σ_i p(g|x_i,y_i)·J_i / max(Σ_i p(g|x_i,y_i), n_min);  R_var(θ, φ) = Var(R_g1(θ), …, R_gM(θ))
    r_var = groups.variance_penalty(groups.group_returns(J, probs.detach(), reduce, n_min))
    return pg_loss, r_var, J, ratio


def critic_loss(v, old_v, returns, r_mask, j_phi, p_phi, rows=None, p_rest=None, *, n_tok, cliprange_value, n_min, reduce=None):
    """The critic's two terms on one global minibatch (PPO_DETAILS 11): the clipped value loss, a
    per-token mean, and φ's objective R_var of the detached terms j_phi under the critic's p_φ, divided
    by their variance over the minibatch. With `rows`, p_phi is those rows' and `p_rest` every row's
    (no gradient), as in policy_loss. Returns (vf_loss, r_var_phi)."""
    v_clipped = old_v + torch.clamp(v - old_v, -cliprange_value, cliprange_value)
    # L^V(V) = ½·max((V(s_t) − R_t)², (V_clip(s_t) − R_t)²),  V_clip = V_old + clip(V − V_old, −ε_V, ε_V)
    vf_loss = (0.5 * torch.max((v - returns) ** 2, (v_clipped - returns) ** 2) * r_mask).sum() / n_tok
    p_phi = p_phi if rows is None else p_rest.detach().index_put((rows,), p_phi)
    j_phi = j_phi.detach()
    moments = torch.stack([torch.ones_like(j_phi).sum(), j_phi.sum(), (j_phi ** 2).sum()])
    n, total, squares = reduce(moments) if reduce is not None else moments
    # R_var(θ, φ) / Var(G): φ's objective divided by the spread of the terms, so that β_critic means the same at any reward scale
    r_var_phi = groups.variance_penalty(groups.group_returns(j_phi, p_phi, reduce, n_min)) / (squares / n - (total / n) ** 2 + 1e-8)
    return vf_loss, r_var_phi


# ----------------------------------------------------------------------------------------------
# The loop: the rollout (steps 1–5) and the update (step 6); PPO's machinery is plumbing.ppo's
# ----------------------------------------------------------------------------------------------
RunningStd = plumbing.RunningStd  # the scores' running std (PPO_DETAILS 8)


def rollout(args, d, policy, reference, critic, scorer, tokenizer, prompts, it, running, groups_of=None, judge=None,
            group_probs=groups.p_phi, kl_weight=adaptive_kl_weight, estimator=GAE):
    """Steps 1–5 on this rank's prompts; returns a dict of [b, …] tensors. `groups_of`: each prompt's
    data group (logs; the seams may read it); `judge`: a scorer that only watches (--judge_reward)."""
    policy.eval()
    groups_of, t0 = groups_of or [None] * len(prompts), time.perf_counter()
    # 1. sample: the data order is the same on every rank, the sampling seed differs per rank
    q_ids, q_mask, resp, texts, logp = plumbing.generate(
        policy, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        max_prompt_len=args.max_len - args.max_new_tokens, seed=args.seed * 100003 + it * d.world + d.rank,
        min_new_tokens=args.min_new_tokens, cache=args.generate_cache, impl=args.generate_impl, return_logprobs=True)
    t_gen = time.perf_counter() - t0
    first = int(q_mask.any(0).nonzero()[0, 0])  # drop the columns that are padding in every row (static KV caches pad)
    q_ids, q_mask = q_ids[:, first:], q_mask[:, first:]
    has_eos, r_mask, P = (resp == tokenizer.eos_token_id).any(-1), plumbing.response_mask(resp, tokenizer.eos_token_id), q_ids.shape[1]
    ids, mask = torch.cat([q_ids, resp], 1).to(d.device), torch.cat([q_mask, r_mask], 1).to(d.device)
    r_mask, logp = r_mask.to(d.device).float(), logp.to(d.device)
    with torch.no_grad():
        # 2. score; scale by the running std; no EOS → below every finished response
        raw = plumbing.in_chunks(scorer, args.forward_batch, prompts, texts, ids, mask)
        bad = int(plumbing.all_reduce_sum((~torch.isfinite(raw)).sum().float(), d).item())
        if bad:  # every rank has the count, so every rank stops
            raise SystemExit(f"ppo_gi: {bad} rollout score(s) from --reward {args.reward} are not finite (NaN or inf); stopped before training on them")
        scores = plumbing.shape_scores(args, d, raw - scorer.center, has_eos.to(d.device), running, it)
        # 3. log π_old: the sampler's own (PPO_DETAILS 2); log π^SFT; values; p(g|x, y)
        ref_logp = plumbing.in_chunks(lambda i, m: plumbing.response_logprobs(reference, i, m, P, args.temperature)[0], args.forward_batch, ids, mask)
        values, probs = plumbing.in_chunks(lambda i, m, g: group_probs(critic, i, m, P, g), args.forward_batch, ids, mask, groups_of)
        values = values[:, P - 1:-1]
        # g_high = argmax_g R_g(score): the group with the highest soft mean score, recomputed each batch
        g_high = groups.high_group(scores, probs, lambda x: plumbing.all_reduce_sum(x, d), args.min_group_frac * args.rollout_batch / args.n_groups)
        p_high = kl_weight(args, scores, probs, g_high, d)
        # 4. token rewards with the adaptive KL penalty
        kl = kl_per_token(logp, ref_logp, args.kl_estimator) * r_mask
        rewards = adaptive_kl_rewards(scores, kl, r_mask, p_high, args.kl_coef)
        # 5. advantages and returns (GAE); G_i = Σ_t γ^t·r_t, the trajectory's scalar return that R_g averages
        advantages, returns = estimator.advantages(args, rewards, values, r_mask, d)
        seq_returns = (rewards * args.gamma ** torch.arange(rewards.shape[1], device=rewards.device)).sum(-1)
        judged = plumbing.in_chunks(judge, args.forward_batch, prompts, texts, ids, mask) if judge else None
    return dict(ids=ids, mask=mask, r_mask=r_mask, logp=logp, values=values, returns=returns, advantages=advantages, judged=judged,
                probs=probs, scores=scores, raw=raw, seq_returns=seq_returns, kl=kl, rewards=rewards, p_high=p_high, g_high=g_high,
                has_eos=has_eos.float(), texts=texts, prompts=prompts, groups=groups_of, P=P,
                perf={"perf/gen_s": t_gen, "perf/score_s": time.perf_counter() - t0 - t_gen})


def ppo_update(args, d, policy, critic, opt_policy, opt_critic, batch, log_stats, it=0, group_probs=groups.p_phi, estimator=GAE):
    """6. PPO epochs over this rank's rollout in global minibatches (each rank holds 1/world of each):
    θ's step, then the critic's, each its own AdamW; the losses span the global minibatch."""
    beta_policy = 0.0 if args.no_gi else args.beta_policy
    beta_critic = args.beta_critic if not args.no_gi and getattr(group_probs, "reads_phi", True) else 0.0
    reduce = lambda x: plumbing.sum_over_ranks(x, d)  # noqa: E731  the group sums over ranks, this rank's share live
    n_min = args.min_group_frac * args.minibatch / args.n_groups  # groups.py: the least size of a group
    n_local, P, gen = batch["ids"].shape[0], batch["P"], torch.Generator().manual_seed(args.seed * 100003 + it)
    for epoch in range(args.ppo_epochs):
        # epoch 0 keeps the rollout order, so global minibatch k holds the same samples under any number of
        # ranks; later epochs permute each rank's samples the same way on all ranks (PPO_DETAILS 14)
        order = torch.arange(n_local) if epoch == 0 else torch.randperm(n_local, generator=gen)
        for idx in order.chunk(args.rollout_batch // args.minibatch):
            mb = plumbing.pick(batch, idx, ("ids", "mask", "r_mask", "advantages", "logp", "probs", "values", "returns", "seq_returns", "groups"))
            n_tok = plumbing.all_reduce_sum(mb["r_mask"].sum().clone(), d)  # response tokens, all ranks
            # G_i centred on the minibatch mean: the floor n_min then shrinks a small group towards the batch mean, not 0
            G = groups.centered(mb["seq_returns"], reduce)
            sums, keep = collections.Counter(), {}

            def theta_loss(rows):
                r = plumbing.pick(mb, rows)
                new_logp, ent = plumbing.response_logprobs(policy, r["ids"], r["mask"], P, args.temperature, with_entropy=True)
                pg_loss, r_var, keep["J"], ratio = policy_loss(
                    new_logp, r["logp"], r["advantages"], r["returns"], r["r_mask"], G, mb["probs"], rows, n_tok=n_tok,
                    minibatch=args.minibatch, cliprange=args.cliprange, n_min=n_min, j_form=args.j_form, reduce=reduce)
                sums.update(plumbing.policy_stats(pg_loss, n_tok, new_logp, r["logp"], ratio, ent, r["r_mask"], args.cliprange))
                keep["groups/r_var_theta"] = r_var.detach()
                # Stage 2, θ: descend L^CLIP(θ) + β_policy·R_var(θ, φ), with p(g|x, y) the rollout's (φ fixed)
                loss = pg_loss + beta_policy * r_var
                return loss

            total = plumbing.backward_in_parts(theta_loss, len(idx), d, args.grad_accum)
            plumbing.optimizer_step(total, policy, opt_policy, log_stats, "ppo_gi policy", backward=False)
            p_rest = None
            if args.grad_accum > 1:  # every row's p(g|·) as the critic has it now, for the parts' R_var
                with torch.no_grad():
                    parts = [plumbing.pick(mb, rows) for rows in torch.arange(len(idx)).chunk(args.grad_accum)]
                    p_rest = torch.cat([group_probs(critic, r["ids"], r["mask"], P, r["groups"])[1] for r in parts])

            def critic_step_loss(rows):
                r = plumbing.pick(mb, rows)
                values, p_phi = group_probs(critic, r["ids"], r["mask"], P, r["groups"])
                v = values[:, P - 1:-1]
                vf_loss, r_var_phi = critic_loss(v, r["values"], r["returns"], r["r_mask"], G if args.j_form == "derived" else keep["J"],
                                                 p_phi, rows, p_rest, n_tok=n_tok, cliprange_value=args.cliprange_value, n_min=n_min, reduce=reduce)
                sums.update(plumbing.critic_stats(vf_loss, n_tok, v, r["values"], r["r_mask"], args.cliprange_value))
                keep["groups/r_var_phi"] = r_var_phi.detach()
                vf_loss = vf_loss if estimator.learns_values else torch.zeros_like(vf_loss)  # RLOO's critic: only φ's body
                # Stage 1, φ: ascend R_var(θ, φ) / Var(G) with θ's terms fixed, as the critic's loss to descend
                loss = vf_loss - beta_critic * r_var_phi
                return loss

            if estimator.learns_values or beta_critic:
                total = plumbing.backward_in_parts(critic_step_loss, len(idx), d, args.grad_accum)
                plumbing.optimizer_step(total, critic, opt_critic, log_stats, "ppo_gi critic", backward=False)
            plumbing.log_update(log_stats, sums, n_tok, d, {k: v for k, v in keep.items() if k.startswith("groups/")})


def main(args, group_probs=groups.p_phi, kl_weight=adaptive_kl_weight, estimator=GAE, load_scorer=reward.load_scorer):
    """Train. The seams, the paper's by default (study/ppo_variants.py passes others):
    `group_probs(critic, ids, mask, P, groups)` gives the values and p(g|·) (one with .reads_phi = False
    leaves φ out of training), `kl_weight(args, scores, probs, g_high, d)` the KL penalty's per-sample
    weight, `estimator` the advantages (GAE), `load_scorer(spec, tokenizer, d, bf16)` the reward r_ψ."""
    plumbing.check_model_dir(args.sft, "--sft", "lm")
    for flag in [f for f in ("reward", "judge_reward") if getattr(args, f)]:
        plumbing.check_reward_dir(getattr(args, flag), f"--{flag}")
    d = plumbing.init_distributed()
    checks = [(args.minibatch > args.rollout_batch, f"--batch_size (--minibatch) {args.minibatch} exceeds --rollout_batch {args.rollout_batch}"),
              (args.rollout_batch % args.minibatch or args.minibatch % d.world,
               f"--rollout_batch {args.rollout_batch} must be a multiple of --minibatch {args.minibatch}, which must split evenly over {d.world} ranks"),
              (args.reward == "gold" and args.data != "toy", "--reward gold is the built-in task's judge: it needs --data toy"),
              (args.max_len <= args.max_new_tokens, f"--max_len {args.max_len} must exceed --max_new_tokens {args.max_new_tokens}"),
              (args.grad_accum > 1 and args.j_form == "slide", "--grad_accum > 1 needs --j_form derived"),
              (not args.no_gi and args.n_groups < 2, f"--n_groups {args.n_groups}: GI-PPO needs at least 2 groups (--no_gi is PPO)"),
              (args.rollout_batch % (estimator.samples_per_prompt * d.world), f"--rollout_batch {args.rollout_batch}: not "
               f"{estimator.samples_per_prompt} samples of each prompt on each of {d.world} ranks")]
    if any(failed for failed, _ in checks):
        parser.error(next(message for failed, message in checks if failed))
    bf16 = bool(args.bf16) if args.bf16 is not None else d.device.type == "cuda"
    plumbing.seed_everything(args.seed)
    records = data.load_prompts(args.data, args.split, group_by=args.group_by)
    prompts, groups_of, all_groups = [x["prompt"] for x in records], [x.get("group") for x in records], data.group_names(records)
    ckpt = plumbing.start_run(args, parser, d, MAY_CHANGE_ON_RESUME, {"--sft": args.sft, "--reward": args.reward, "--judge_reward": args.judge_reward})
    tokenizer = plumbing.load_tokenizer(args.sft)
    if d.main:  # how many prompts --max_len − --max_new_tokens cuts (from the left)
        cut = sum(len(plumbing.encode(tokenizer, x)[0]) > args.max_len - args.max_new_tokens for x in prompts)
        plumbing.report_truncation("ppo_gi", collections.Counter(cut=cut), len(prompts), args.max_len, "prompts")
    # the reward models read the policy's token ids: the same tokenizer, or stop here
    plumbing.check_same_tokenizer({"--sft": tokenizer, **{f"--{k}": plumbing.load_tokenizer(getattr(args, k))
                                                          for k in ("reward", "judge_reward") if getattr(args, k) not in (None, "gold")}})
    policy = plumbing.load_model(os.path.join(ckpt, "policy") if ckpt else args.sft, tokenizer)
    reference = plumbing.load_model(args.sft, tokenizer, dtype=plumbing.frozen_dtype(d))
    critic = groups.load_critic(os.path.join(ckpt, "critic") if ckpt else (args.sft if args.reward == "gold" else args.reward),
                                tokenizer, args.n_groups, seed=args.seed)
    # φ takes no step without the group term or when p(g|·) does not read it: its head is frozen (no optimizer state)
    critic.group_head.requires_grad_(phi_steps := not args.no_gi and getattr(group_probs, "reads_phi", True))
    for model in (policy, reference, critic):  # dropout off everywhere (PPO_DETAILS 1): eval mode, gradients still flow
        plumbing.shard(model.eval(), d, bf16=bf16, checkpointing=args.gradient_checkpointing and model is not reference)
    reference.requires_grad_(False)
    scorer = load_scorer(args.reward, tokenizer, d, bf16)
    judge = reward.load_scorer(args.judge_reward, tokenizer, d, bf16) if args.judge_reward else None
    models = {"policy": policy, "critic": critic}
    optimizers = {"policy": plumbing.optimizer(policy, args.lr), "critic": plumbing.optimizer(critic, args.critic_lr)}
    running, state = RunningStd(), {"step": 0}
    if ckpt:
        state = plumbing.load_optimizer_state(ckpt, models, optimizers, d)
        running.__dict__.update(state["running"])
    first = state["step"]
    log = plumbing.MetricsLog(os.path.join(args.out, "metrics.jsonl"), d, state, report_to=args.report_to)
    if d.main:
        variant = "PPO" + (" w/o KL" if args.kl_coef == 0 else " w/ KL") if args.no_gi else "GI-PPO"
        print(f"ppo_gi: {variant} from {args.sft} with reward {args.reward} on {args.data}/{args.split} "
              f"({len(prompts)} prompts), {d.world} process(es), iterations {first}..{args.steps}")

    # updates this process will try: per minibatch, epoch and iteration the policy's, and the critic's unless it takes none (RLOO w/o φ)
    planned = (1 + bool(estimator.learns_values or phi_steps and args.beta_critic)) * args.ppo_epochs * (args.rollout_batch // args.minibatch)
    planned, skipped = planned * (min(args.stop_at or args.steps, args.steps) - first), 0
    bar = plumbing.progress(range(first, args.steps), d, initial=first, total=args.steps, desc="ppo")
    for it in bar:
        k = estimator.samples_per_prompt  # each prompt's samples, side by side
        mine = [i for i in plumbing.batch_indices(it, args.rollout_batch // k, len(prompts), args.seed)[d.rank::d.world] for _ in range(k)]
        # learning rate: linear warm-up over --warmup iterations, then constant or a cosine to 10% at the last
        lr_scale = plumbing.lr_at(it, args.steps - 1, args.warmup, 1.0) if args.decay == "cosine" else min(1.0, (it + 1) / max(args.warmup, 1))
        for name, lr in (("policy", args.lr), ("critic", args.critic_lr)):
            for group in optimizers[name].param_groups:
                group["lr"] = lr * lr_scale
        batch = rollout(args, d, policy, reference, critic, scorer, tokenizer, [prompts[i] for i in mine], it, running,
                        groups_of=[groups_of[i] for i in mine], judge=judge, group_probs=group_probs, kl_weight=kl_weight, estimator=estimator)
        stats, t_train = {}, time.perf_counter()
        ppo_update(args, d, policy, critic, optimizers["policy"], optimizers["critic"], batch, stats, it, group_probs=group_probs, estimator=estimator)
        skipped += stats.get("skipped", 0)
        plumbing.fail_if_mostly_skipped("ppo_gi", skipped, planned, args.max_skipped)
        perf = {**batch["perf"], "perf/train_s": time.perf_counter() - t_train, "perf/peak_rss_mb": plumbing.peak_rss_mb()}
        perf["perf/step_s"] = perf["perf/gen_s"] + perf["perf/score_s"] + perf["perf/train_s"]
        # tokens of all ranks: generated (response up to its EOS) and real (non-pad) prompt + response
        n_gen, n_seq = plumbing.all_reduce_sum(torch.stack([batch["r_mask"].sum().float(), batch["mask"].sum().float()]), d).tolist()
        perf.update({"perf/gen_tokens_per_s": n_gen / max(perf["perf/gen_s"], 1e-9), **plumbing.perf_metrics(n_seq, perf["perf/step_s"], d.device)})
        if (it + 1) % args.log_every == 0 or it == 0:
            m = plumbing.iteration_metrics(args, d, batch, stats, running, all_groups)
            if args.data == "toy":  # the gold judge watching the sampled responses, per true group
                gold = [toy.gold_score(p, t) for p, t in zip(batch["prompts"], batch["texts"])]
                m.update(plumbing.group_means("gold", gold, [toy.true_group(p) for p in batch["prompts"]], toy.GROUPS, d))
            log.log(it + 1, {**m, **perf, "lr": optimizers["policy"].param_groups[0]["lr"]})
            bar.set_postfix(score=f"{m['objective/scores']:.3f}", kl=f"{m['objective/kl']:.3f}")
        if args.sample_every and (it + 1) % args.sample_every == 0:  # a few of rank 0's samples, as a table
            seq_kl = (batch["kl"] * batch["r_mask"]).sum(-1).tolist()
            log.log_samples(it + 1, [{"prompt": p[-300:], "response": t, "score": round(s, 4), "group": g, "kl": round(k, 4)} for p, t, s, g, k
                                     in zip(batch["prompts"], batch["texts"], batch["raw"].tolist(), batch["groups"], seq_kl)][:8])
        if it + 1 == args.steps and d.main:  # before the final checkpoint: a run resumed from it keeps them
            plumbing.write_jsonl(os.path.join(args.out, "rollouts.jsonl"), [{"prompt": p, "response": t, "reward": s} for p, t, s in
                                                                             zip(batch["prompts"], batch["texts"], batch["raw"].tolist())])
        if args.save_every and ((it + 1) % args.save_every == 0 or it + 1 in (args.steps, args.stop_at)):
            plumbing.save_checkpoint(args.out, it + 1, models, optimizers, tokenizer, {"step": it + 1, "running": dict(running.__dict__),
                                     "args": vars(args), "log_bytes": log.tell()}, d, keep=args.keep_checkpoints)
        if it + 1 == args.stop_at:
            if d.main:
                print(f"ppo_gi: stopped at iteration {it + 1} (--stop_at); continue with --resume")
            plumbing.close_distributed(d)
            return
    if args.data == "toy" and args.eval_prompts:
        test = [x["prompt"] for x in data.load_prompts("toy", f"{args.eval_split}[:{args.eval_prompts}]")]
        gold = toy.gold_by_group(policy, tokenizer, test, d)
        summary = {**{f"eval/gold/{g}": v for g, v in gold.items()}, "eval/gold_mean": sum(gold.values()) / len(gold)}
        log.log(args.steps, summary)
        if d.main:
            print("ppo_gi: greedy gold on test: " + "  ".join(f"{k[10:]}={v:.3f}" for k, v in summary.items()))
    plumbing.save_model(critic, tokenizer, os.path.join(args.out, "critic"), d)
    plumbing.save_model(policy, tokenizer, args.out, d, extra={"ppo_args.json": vars(args)})  # config.json last: the run is done
    if d.main:
        print(f"ppo_gi: saved {args.out} (policy) and {args.out}/critic")
    log.close()
    plumbing.close_distributed(d)


if __name__ == "__main__":
    plumbing.run_main(main, parser)
