"""ppo_gi.py: Stage 2 of the method (group invariant policy gradient + adaptive KL) on a PPO base.

The policy θ starts from SFT, the frozen reference π^SFT too; the critic (values V and the group
classifier p_φ of groups.py) starts from the reward model. Each iteration, numbered as the paper's
algorithm box:
  1. sample responses to a batch of prompts from π_θ;
  2. score them with the reward model r_ψ (a response with no EOS scores below every finished one);
  3. take log π_θ (old) from the sampler, compute log π^SFT, V(s_t) and p_φ(g|x,y) on the samples;
  4. token rewards: −η·p_φ(g_high|x,y)·KL_t on every response token, + the score on the last one;
  5. GAE advantages and returns;
  6. PPO epochs: θ descends the clipped surrogate + β_policy·R_var (φ fixed); the critic descends
     the clipped value loss − β_critic·R_var (θ's terms detached), i.e. φ ascends R_var.
     R_var's θ-gradient is the chain rule's: Σ_i w_i·∇_θ S_i with w_i = ∂R_var/∂G_i (policy_loss).

Flags give the paper's baselines and ablations with the same code:
  --no_gi          plain PPO with KL (β_policy = β_critic = 0, p_high ≡ 1)
  --kl_coef 0      PPO without KL (the paper's "PPO", with --no_gi)
  --fixed_kl       group invariance without the adaptive KL (p_high ≡ 1)
  --beta_policy 0  adaptive KL without the group invariant term
  --shuffle_rewards  the no-signal control: what the update moves with no reward information

    python ppo_gi.py                                   # GI-PPO on the built-in task, 1 process
    torchrun --nproc_per_node 2 ppo_gi.py              # the same on 2 CPU processes (FSDP2, gloo)
    torchrun --nproc_per_node 8 ppo_gi.py --sft runs/sft-7b --reward runs/rm-7b \\
        --data Anthropic/hh-rlhf --split train --lr 5e-7 --critic_lr 1.5e-6 \\
        --rollout_batch 512 --batch_size 64 --max_new_tokens 256 --max_len 768          # 1 node, 8 GPUs
    torchrun --nnodes 2 --node_rank $RANK --master_addr $HOST --master_port 29500 \\
        --nproc_per_node 8 ppo_gi.py ...                                                  # 2 nodes

The study's variants (RESULTS.md, "What carries the effect"): --groups known (the data's groups as
one-hot p(g|x)), --group_input prompt (p_φ(g|x)), --kl_weight rank (the KL weight from the score's rank).

Writes `--out` (default runs/gi_ppo): the policy (save_pretrained), critic/ (with the group head in
extra_heads.pt), rollouts.jsonl (the last iteration's samples), metrics.jsonl, checkpoints/step-N/.
"""
import argparse
import collections
import math
import os
import time

import torch
import torch.distributed as dist

import data
import groups
import plumbing
import reward
import sft

count, rate = plumbing.at_least(1), plumbing.at_least(0.0, float)
# flags that --resume may change: how long, how often to log, evaluate or save; none changes the model, the data or a shape
MAY_CHANGE_ON_RESUME = {"steps", "stop_at", "resume", "save_every", "log_every", "eval_prompts", "eval_split", "max_skipped", "grad_cos",
                        "keep_checkpoints", "report_to", "sample_every", "judge_reward"}
# fmt: off
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--sft", default="runs/sft", help="SFT directory: initial policy and frozen reference π^SFT")
parser.add_argument("--reward", default="runs/reward", help="reward model directory (also the critic's init), or 'gold' for the built-in gold judge")
parser.add_argument("--data", default="toy", help="data.py spec of prompts")
parser.add_argument("--split", default="rl", help="prompt split (real data: data.py carves train / rl / judge / test)")
parser.add_argument("--group_by", choices=["harm"], default=None, help="HH-RLHF: fold the four subsets into the groups harmless / helpful (as the paper reports them)")
parser.add_argument("--eval_split", default="test", help="prompts of the greedy evaluation at the end (built-in task: gold per true group)")
parser.add_argument("--out", default="runs/gi_ppo", help="output directory")
parser.add_argument("--steps", type=count, default=60, help="PPO iterations (rollout + update)")
parser.add_argument("--rollout_batch", type=count, default=64, help="prompts per iteration (all ranks together)")
parser.add_argument("--batch_size", "--minibatch", dest="minibatch", type=count, default=64, help="samples per PPO update (the global batch of one optimizer step, all ranks together); large, so that a step follows the reward rather than sampling noise")
parser.add_argument("--grad_accum", type=count, default=1, help="micro-batches per rank per PPO update (gradient accumulation: the same update in less memory)")
parser.add_argument("--forward_batch", type=plumbing.at_least(0), default=0, help="rows per forward pass when a rollout is scored (reward, reference log-probs, values; 0: a rank's whole rollout at once)")
parser.add_argument("--ppo_epochs", type=count, default=1, help="passes over each rollout (MOSS-RLHF: 1)")
parser.add_argument("--max_new_tokens", type=count, default=24, help="response length limit")
parser.add_argument("--min_new_tokens", type=plumbing.at_least(0), default=0, help="suppress EOS before this many tokens (benchmarks)")
parser.add_argument("--max_len", type=plumbing.at_least(2), default=152, help="max tokens of prompt + response: prompts are cut from the left to --max_len − --max_new_tokens")
parser.add_argument("--temperature", type=plumbing.at_least(0.0, float, above=True), default=1.0, help="sampling temperature; log-probs are taken at the same T")
parser.add_argument("--lr", type=rate, default=2e-5, help="policy learning rate: small enough that the no-signal control (--shuffle_rewards) leaves the policy where it was")
parser.add_argument("--warmup", type=plumbing.at_least(0), default=0, help="iterations of linear learning-rate warm-up (policy and critic)")
parser.add_argument("--decay", choices=["none", "cosine"], default="none", help="after the warm-up: a constant learning rate, or cosine decay to 10%% of the peak at the last iteration")
parser.add_argument("--critic_lr", type=rate, default=3e-4, help="critic + group head learning rate: the value head must track returns within a few iterations")
parser.add_argument("--kl_coef", type=rate, default=0.05, help="η: KL penalty coefficient (0: PPO without KL)")
parser.add_argument("--kl_estimator", choices=["k1", "k3"], default="k1", help="per-token KL estimate penalized and logged")
parser.add_argument("--beta_policy", type=rate, default=0.5, help="β_policy: weight of R_var in the policy loss: how far learning shifts from the best group to the worst")
parser.add_argument("--beta_critic", type=rate, default=1.0, help="β_critic: weight of R_var / Var(G) (maximized, so scale-free) in the critic loss")
parser.add_argument("--groups", choices=["inferred", "known"], default="inferred", help="inferred: the paper's p_φ(g|x,y), a head on the critic trained to maximize R_var; known: each record's `group` label as a one-hot p(g|x) (φ takes no step; M = the number of labels)")
parser.add_argument("--group_input", choices=["response", "prompt"], default="response", help="what p_φ reads: the critic's hidden state at the last response token (the paper's p_φ(g|x,y)) or at the last prompt token (p_φ(g|x): groups of prompts)")
parser.add_argument("--n_groups", type=count, default=2, help="M, the number of inferred groups")
parser.add_argument("--min_group_frac", type=rate, default=1.0, help="a group's mean divides by at least this · batch / M samples, so φ cannot isolate one outlier (0: the slide's raw soft mean)")
parser.add_argument("--j_form", choices=["derived", "slide"], default="derived", help="J_i inside R_g: derived = value G_i (the return), θ-gradient of the PPO surrogate S_i (the chain rule); slide = Σ_t log π_θ·R_t taken as a value")
parser.add_argument("--grad_cos", type=int, choices=[0, 1], default=0, help="diagnostic: log groups/grad_cos, the cosine between the θ-gradients of the PPO and group terms (costs one extra backward per iteration)")
parser.add_argument("--no_gi", action="store_true", help="plain PPO: no group invariant term, p_high ≡ 1")
parser.add_argument("--fixed_kl", action="store_true", help="keep group invariance, but p_high ≡ 1 (no adaptive KL)")
parser.add_argument("--kl_weight", choices=["group", "rank"], default="group", help="per-sample KL weight: group = p_φ(g_high|x,y) (≡ 1 with --no_gi or --fixed_kl); rank = the rank of the sample's score in its rollout batch, scaled to [0, 1] (the adaptive KL with the groups collapsed onto reward level)")
parser.add_argument("--gamma", type=plumbing.fraction, default=1.0, help="GAE γ")
parser.add_argument("--lam", type=plumbing.fraction, default=0.95, help="GAE λ")
parser.add_argument("--cliprange", type=plumbing.at_least(0.0, float, above=True), default=0.2, help="PPO ratio clip ε")
parser.add_argument("--cliprange_value", type=plumbing.at_least(0.0, float, above=True), default=0.2, help="value clip")
parser.add_argument("--whiten_advantages", type=int, choices=[0, 1], default=1, help="whiten advantages over valid tokens of the rollout, all ranks (1) or not (0)")
parser.add_argument("--no_eos_margin", type=rate, default=1.0, help="a response that never emits EOS scores this far (scaled units) below the batch's lowest finished response")
parser.add_argument("--shuffle_rewards", action="store_true", help="no-signal control: permute the final scores (no-EOS floor included) within each rank's share of the rollout batch, so any change is the update's noise")
parser.add_argument("--reward_clip", type=rate, default=0.0, help="clip the scaled score to ±this (0: off; PPO-max uses 0.8)")
parser.add_argument("--eval_prompts", type=plumbing.at_least(0), default=200, help="toy only: greedy-decode this many --eval_split prompts at the end and report gold scores")
parser.add_argument("--judge_reward", default=None, help="a reward model that only watches: its scores of the same rollouts are logged as judge/* (Gao et al.'s proxy/gold protocol on real data); never trained on")
parser.add_argument("--sample_every", type=plumbing.at_least(0), default=0, help="every K iterations, log a table of sampled completions: prompt, response, score, group, KL (0: never)")
parser.add_argument("--report_to", choices=["none", "tensorboard"], default="none", help="also log to TensorBoard (OUT/tensorboard; needs the tensorboard package)")
parser.add_argument("--gradient_checkpointing", type=int, choices=[0, 1], default=0, help="1: recompute each decoder block's activations in the backward pass (policy and critic; less memory, more time)")
parser.add_argument("--keep_checkpoints", type=count, default=1, help="keep the newest K checkpoints in OUT/checkpoints (policy/ and critic/: save_pretrained folders)")
parser.add_argument("--save_every", type=plumbing.at_least(0), default=20, help="checkpoint every K iterations (0: never)")
parser.add_argument("--stop_at", type=count, default=None, help="stop after this iteration as if interrupted (for resume tests)")
parser.add_argument("--resume", action="store_true", help="continue from the newest of OUT/checkpoints; only these flags may differ from the run being resumed: " + ", ".join(f"--{k}" for k in sorted(MAY_CHANGE_ON_RESUME)))
parser.add_argument("--max_skipped", type=plumbing.fraction, default=0.1, help="fail (no model saved, exit 1) when more than this share of the updates were skipped as non-finite")
parser.add_argument("--seed", type=int, default=1, help="seed for data order and sampling")
parser.add_argument("--bf16", type=int, default=None, help="bf16 autocast compute, fp32 weights (default: on under CUDA, off on CPU)")
parser.add_argument("--generate_cache", choices=plumbing.CACHE_KINDS, default=None, help="rollout KV cache: dynamic, static, or compiled (static + compiled decode step); default: plumbing.GENERATE_CACHE for the device")
parser.add_argument("--generate_impl", choices=plumbing.GENERATE_IMPLS, default=None, help="rollout sampler: loop (plumbing's own decoding loop) or hf (transformers' generate, for comparison); default: plumbing.GENERATE_IMPL")
parser.add_argument("--log_every", type=count, default=1, help="metrics every K iterations")
# fmt: on


# ----------------------------------------------------------------------------------------------
# The algorithm's core: hand-written, each line under the equation it computes
# ----------------------------------------------------------------------------------------------
def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over [B, T] tensors; mask is 1 on response tokens (a
    prefix of each row). The value after the last response token is 0. Returns (A, A + V)."""
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


def kl_per_token(logp, ref_logp, estimator="k1"):
    """Per-token estimate of KL(π_θ || π^SFT) on the sampled tokens."""
    if estimator == "k1":
        return logp - ref_logp  # unbiased, can be negative per sample
    log_ratio = ref_logp - logp
    return log_ratio.exp() - 1 - log_ratio  # k3 = (ratio − 1) − log ratio, ratio = π^SFT/π_θ, ≥ 0


def adaptive_kl_rewards(scores, kl, mask, p_high, eta):
    """Token rewards: −η·p_φ(g_high|x,y)·KL_t on every response token, plus the score on the last
    real response token (the EOS if the response has one). With p_high ≡ 1: the fixed-KL reward."""
    # r_total = r_ψ(x, y) − η · p_φ(g_high|x, y) · KL(π_θ^RL(y|x) || π^SFT(y|x))
    rewards = -eta * p_high[:, None] * kl * mask
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def response_mask(resp, eos_id):
    """1 on every response token up to and including the first EOS, 0 after it (PPO_DETAILS 4)."""
    is_eos = (resp == eos_id).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


def masked_whiten(x, mask, d):
    """(x − mean)/std over valid tokens of all ranks (world-size invariant)."""
    stats = plumbing.all_reduce_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]), d)
    mean = stats[0] / stats[2]
    var = stats[1] / stats[2] - mean ** 2
    return (x - mean) * torch.rsqrt(var.clamp(min=1e-8)) * mask


def rank_weights(scores, d):
    """q_i ∈ [0, 1]: the rank of each sample's score within the whole rollout batch (all ranks),
    0 for the lowest and 1 for the highest; tied scores share their mean rank (`--kl_weight rank`)."""
    every = scores
    if d.sharded:
        parts = [torch.empty_like(scores) for _ in range(d.world)]
        dist.all_gather(parts, scores.contiguous())
        every = torch.cat(parts)
    below = (every[None, :] < scores[:, None]).sum(-1)
    ties = (every[None, :] == scores[:, None]).sum(-1)
    # q_i = (#{j: s_j < s_i} + (#{j: s_j = s_i} − 1)/2) / (N − 1)
    return (below + (ties - 1) / 2) / max(len(every) - 1, 1)


def per_trajectory_terms(j_form, G, pg_per_token, n_tok, minibatch, new_logp, returns, r_mask):
    """J_i [b], the per-trajectory term inside R_g(θ) for the θ step."""
    if j_form == "derived":
        # S_i(θ): trajectory i's clipped surrogate, scaled so that its mean over the global minibatch
        # is the PPO objective −pg_loss (Σ_i,t over n_tok tokens): both terms share a scale
        S = -pg_per_token.sum(-1) * minibatch / n_tok
        # J_i = G_i + S_i − stopgrad(S_i): value G_i (the return), gradient ∇_θ S_i. Through R_g, R_var:
        #   ∇_θ R_var = Σ_g ∂R_var/∂R_g · ∇_θ R_g = Σ_i w_i · ∇_θ S_i,   w_i = ∂R_var/∂G_i
        return G.detach() + S - S.detach()
    # --j_form slide: J_i = Σ_t log π_θ(a_t|s_t) · R_t  (R_t: the GAE return, detached)
    return (new_logp * returns * r_mask).sum(-1)


def policy_loss(new_logp, old_logp, adv, returns, r_mask, G, probs, *, n_tok, minibatch, cliprange, n_min,
                j_form="derived", reduce=None, micro=None):
    """θ's two losses on one minibatch, a pure function of tensors (tests check it by hand):
    the clipped surrogate, a per-token mean over the global minibatch of n_tok response tokens
    (PPO_DETAILS 11), and R_var(θ, φ) of the terms J_i with p(g|x, y) fixed (`probs`, no gradient),
    whose θ-gradient is the group invariant term. `reduce` sums the group sums over ranks.
    Gradient accumulation: with `micro` (row indices into G and probs) the first five tensors are
    that micro-batch's rows only; R_var then takes every other row's J_i at its value G_i, so the
    micro-batches' gradients add up to the whole minibatch's. Returns (pg_loss, r_var, J, ratio,
    per-token surrogate)."""
    ratio = (new_logp - old_logp).exp()
    # L^CLIP(θ) = E_t[max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))],  ρ_t = π_θ(a_t|s_t) / π_θold(a_t|s_t)
    pg_per_token = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)) * r_mask
    pg_loss = pg_per_token.sum() / n_tok
    J = per_trajectory_terms(j_form, G if micro is None else G[micro], pg_per_token, n_tok, minibatch, new_logp, returns, r_mask)
    if micro is not None:
        J = G.detach().index_put((micro,), J)
    # R_g(θ) = Σ_i p(g|x_i,y_i)·J_i / max(Σ_i p(g|x_i,y_i), n_min);  R_var(θ, φ) = Var(R_g1(θ), …, R_gM(θ))
    r_var = groups.variance_penalty(groups.group_returns(J, probs.detach(), reduce, n_min))
    return pg_loss, r_var, J, ratio, pg_per_token


def critic_loss(v, old_v, returns, r_mask, j_phi, p_phi, *, n_tok, cliprange_value, n_min, reduce=None, micro=None, p_rest=None):
    """The critic's two losses on one minibatch, a pure function of tensors: the clipped value loss,
    a per-token mean over the global minibatch (PPO_DETAILS 11), and φ's objective R_var of the
    detached terms j_phi under the critic's own p_φ, divided by their variance over the minibatch so
    that β_critic means the same at any reward scale. With `micro`, v … p_phi are that micro-batch's
    rows and `p_rest` every row's p_φ without gradient (as policy_loss). Returns (vf_loss, r_var_phi)."""
    v_clipped = old_v + torch.clamp(v - old_v, -cliprange_value, cliprange_value)
    # L^V(V) = ½·max((V(s_t) − R_t)², (V_clip(s_t) − R_t)²),  V_clip = V_old + clip(V − V_old, −ε_V, ε_V)
    vf_loss = (0.5 * torch.max((v - returns) ** 2, (v_clipped - returns) ** 2) * r_mask).sum() / n_tok
    if micro is not None:
        p_phi = p_rest.detach().index_put((micro,), p_phi)
    j_phi = j_phi.detach()
    moments = torch.stack([torch.ones_like(j_phi).sum(), j_phi.sum(), (j_phi ** 2).sum()])
    n, total, squares = reduce(moments) if reduce is not None else moments
    var_j = squares / n - (total / n) ** 2
    # φ: max R_var(θ, φ) = Var(R_g1, …, R_gM), R_g = Σ_i p_φ(g|x_i,y_i)·J_i / max(Σ_i p_φ(g|x_i,y_i), n_min)
    r_var_phi = groups.variance_penalty(groups.group_returns(j_phi, p_phi, reduce, n_min)) / (var_j + 1e-8)
    return vf_loss, r_var_phi


# ----------------------------------------------------------------------------------------------
# Boilerplate: the scorer, running reward scale, rollout and update loops
# ----------------------------------------------------------------------------------------------
class RunningStd:
    """Running std of the scores, merged across ranks and kept across iterations (PPO_DETAILS 8)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, x, d):
        finite = torch.isfinite(x)
        if not finite.all():  # one NaN would leave the std NaN for the rest of the run
            print(f"ppo_gi: RunningStd ignores {int((~finite).sum())} non-finite score(s) of {len(x)}")
        x = x[finite].double()  # sums of squares in float64: float32 can make m2 of equal values negative
        s = plumbing.all_reduce_sum(torch.stack([x.new_tensor(float(len(x))), x.sum(), (x * x).sum()]), d)
        if s[0] == 0:
            return
        n, mean = s[0].item(), (s[1] / s[0]).item()
        m2 = max((s[2] - s[0] * mean ** 2).item(), 0.0)
        delta, total = mean - self.mean, self.count + n
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self):
        std = math.sqrt(self.m2 / max(self.count - 1, 1)) if self.count > 1 else 1.0
        return std if std > 1e-6 else 1.0  # every score so far the same: nothing to scale by


def shape_scores(args, d, centered, has_eos, running, it):
    """Step 2's arithmetic on the centred scores [b]: divide by the running std (PPO_DETAILS 8),
    clip, put a response with no EOS below every finished one (PPO_DETAILS 5), and for the
    no-signal control shuffle the scores among this rank's samples."""
    running.update(centered, d)
    scores = centered / running.std
    if args.reward_clip:
        scores = scores.clamp(-args.reward_clip, args.reward_clip)
    lowest_finished = plumbing.global_min(torch.where(has_eos, scores, torch.full_like(scores, math.inf)), d)
    if not math.isfinite(lowest_finished):  # no response in the batch finished
        lowest_finished = plumbing.global_min(scores, d)
    scores = torch.where(has_eos, scores, torch.full_like(scores, lowest_finished - args.no_eos_margin))
    if args.shuffle_rewards:
        shuffle = torch.Generator().manual_seed(args.seed * 100003 + it * d.world + d.rank + 7919)
        scores = scores[torch.randperm(len(scores), generator=shuffle).to(scores.device)]
    return scores


def rollout(args, d, policy, reference, critic, scorer, tokenizer, prompts, it, running, labels=None, judge=None, groups_of=None):
    """Steps 1–5 of the algorithm box on this rank's prompts; returns a dict of [b, …] tensors.
    `labels` [b]: each prompt's group index under --groups known (else None); `judge`: a scorer
    that only watches (--judge_reward); `groups_of`: each prompt's group name, for the logs."""
    policy.eval()
    t0 = time.perf_counter()
    # 1. sample: the data order is the same on every rank, the sampling seed differs per rank
    q_ids, q_mask, resp, texts, sampler_logp = plumbing.generate(
        policy, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        max_prompt_len=args.max_len - args.max_new_tokens, seed=args.seed * 100003 + it * d.world + d.rank,
        min_new_tokens=args.min_new_tokens, cache=args.generate_cache, impl=args.generate_impl, return_logprobs=True)
    t_gen = time.perf_counter() - t0
    # the static KV caches pad every prompt to its longest allowed length: drop the columns that are padding in
    # every row, so that the scoring forwards and the update do not compute on them
    first = int(q_mask.any(0).nonzero()[0, 0])
    q_ids, q_mask = q_ids[:, first:], q_mask[:, first:]
    has_eos = (resp == tokenizer.eos_token_id).any(-1)
    r_mask = response_mask(resp, tokenizer.eos_token_id)
    ids = torch.cat([q_ids, resp], 1).to(d.device)
    mask = torch.cat([q_mask, r_mask], 1).to(d.device)
    r_mask, P = r_mask.to(d.device).float(), q_ids.shape[1]
    if labels is not None:
        labels = labels.to(d.device)
    with torch.no_grad():
        # 2. score; scale by the running std; no EOS → below every finished response (PPO_DETAILS 5)
        raw = plumbing.in_chunks(scorer, args.forward_batch, prompts, texts, ids, mask)
        bad = int(plumbing.all_reduce_sum((~torch.isfinite(raw)).sum().float(), d).item())
        if bad:  # every rank has the count, so every rank stops
            raise SystemExit(f"ppo_gi: {bad} rollout score(s) from --reward {args.reward} are not finite (NaN or inf); stopped before training on them")
        scores = shape_scores(args, d, raw - scorer.center, has_eos.to(d.device), running, it)
        # 3. old log-probs (the sampler's own, PPO_DETAILS 2: the same weights and T), reference
        # log-probs, values, group probabilities
        logp = sampler_logp.to(d.device)
        ref_logp = plumbing.in_chunks(lambda i, m: plumbing.response_logprobs(reference, i, m, P, args.temperature)[0], args.forward_batch, ids, mask)
        values, probs = plumbing.in_chunks(lambda i, m, lab: groups.group_probs(args, critic, i, m, P, lab), args.forward_batch, ids, mask, labels)
        values = values[:, P - 1:-1]
        # g_high: the group with the highest soft mean of the scalar score, recomputed each batch
        g_high = groups.high_group(scores, probs, lambda x: plumbing.all_reduce_sum(x, d),
                                   args.min_group_frac * args.rollout_batch / args.n_groups)
        if args.kl_weight == "rank":
            p_high = rank_weights(scores, d)
        else:
            p_high = torch.ones_like(scores) if (args.no_gi or args.fixed_kl) else probs[:, g_high]
        # 4. token rewards with the adaptive KL penalty
        kl = kl_per_token(logp, ref_logp, args.kl_estimator) * r_mask
        rewards = adaptive_kl_rewards(scores, kl, r_mask, p_high, args.kl_coef)
        # 5. advantages and returns
        advantages, returns = gae(rewards, values, r_mask, args.gamma, args.lam)
        # G_i = Σ_t γ^t·r_t: the trajectory's scalar return, whose group means R_g are (groups.py)
        seq_returns = (rewards * args.gamma ** torch.arange(rewards.shape[1], device=rewards.device)).sum(-1)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, r_mask, d)
        judged = plumbing.in_chunks(judge, args.forward_batch, prompts, texts, ids, mask) if judge else None
    return dict(ids=ids, mask=mask, r_mask=r_mask, logp=logp, values=values, returns=returns, advantages=advantages, judged=judged,
                probs=probs, scores=scores, raw=raw, seq_returns=seq_returns, kl=kl, rewards=rewards, p_high=p_high, g_high=g_high,
                has_eos=has_eos.float(), texts=texts, prompts=prompts, groups=groups_of or [None] * len(prompts), P=P,
                perf={"perf/gen_s": t_gen, "perf/score_s": time.perf_counter() - t0 - t_gen})


def ppo_update(args, d, policy, critic, opt_policy, opt_critic, batch, log_stats, it=0):
    """6. PPO epochs over this rank's rollout in minibatches (each rank holds 1/world of every
    global minibatch), each in --grad_accum micro-batches. Losses are per-token means over the
    global minibatch; R_var spans it too."""
    gi, phi_learns = not args.no_gi, not args.no_gi and args.groups == "inferred"
    n_local = batch["ids"].shape[0]
    n_mb = args.rollout_batch // args.minibatch
    gen = torch.Generator().manual_seed(args.seed * 100003 + it)
    reduce = lambda x: plumbing.global_sum(x, d)  # noqa: E731  sums over ranks that gradients flow through
    n_min = args.min_group_frac * args.minibatch / args.n_groups  # groups.py: the least size of a group
    names = ["policy/loss", "val/loss", "policy/approxkl", "policy/clipfrac", "policy/entropy", "val/clipfrac"]
    for epoch in range(args.ppo_epochs):
        # epoch 0 keeps the rollout order (already a random draw of prompts): global minibatch k is
        # then the same samples under any number of ranks. Later epochs: a fresh permutation of each
        # rank's samples, the same on all ranks (PPO_DETAILS 14).
        order = torch.arange(n_local) if epoch == 0 else torch.randperm(n_local, generator=gen)
        for k, idx in enumerate(order.chunk(n_mb)):
            mb = {key: batch[key][idx] for key in ("ids", "mask", "r_mask", "advantages", "logp", "probs", "values",
                                                   "returns", "seq_returns")}
            P = batch["P"]
            n_tok = plumbing.all_reduce_sum(mb["r_mask"].sum().clone(), d)  # response tokens, all ranks
            # G_i: trajectory i's scalar return Σ_t γ^t·r_t, centred on the minibatch mean. R_var does not
            # depend on where zero is, except through the floor n_min, which should shrink a small group's
            # R_g towards the batch mean, not towards 0.
            G = groups.centered(mb["seq_returns"], reduce)
            # micro-batches: None is the whole minibatch at once; else row indices of each
            micros = [None] if args.grad_accum == 1 else list(torch.arange(len(idx)).chunk(args.grad_accum))
            rows = lambda key, m: mb[key] if m is None else mb[key][m]  # noqa: E731
            sums, loss_sum, w = torch.zeros(6, device=d.device), 0.0, None

            # θ step: the clipped surrogate + β_policy·R_var(θ, φ), p(g|x, y) the rollout's (fixed)
            for m in micros:
                new_logp, ent = plumbing.response_logprobs(policy, rows("ids", m), rows("mask", m), P, args.temperature, with_entropy=True)
                old_logp, r_mask = rows("logp", m), rows("r_mask", m)
                pg_loss, r_var_theta, J, ratio, _ = policy_loss(
                    new_logp, old_logp, rows("advantages", m), rows("returns", m), r_mask, G, mb["probs"], n_tok=n_tok,
                    minibatch=args.minibatch, cliprange=args.cliprange, n_min=n_min, j_form=args.j_form, reduce=reduce, micro=m)
                if w is None:
                    # w_i = ∂R_var/∂J_i, for the log: how strongly the group term re-weights trajectory i (the
                    # differentiable group sums add every rank's share of the gradient, hence / world)
                    w = torch.autograd.grad(r_var_theta, J, retain_graph=True)[0] / d.world
                # ∇_θ: E[Σ_t ∇ log π_θ(a_t|s_t) R_t] − β_policy · ∇_θ R_var(θ, φ), as a loss to descend.
                # × d.world: FSDP2 averages gradients over ranks, and pg_loss is already a mean over the global
                # minibatch (n_tok counts every rank's tokens). R_var needs no factor: its all-reduced group sums
                # sum its gradient over ranks in the backward pass, which the average then undoes.
                gi_loss = args.beta_policy * r_var_theta if gi else 0.0
                if gi and k == 0 and epoch == 0 and args.grad_cos and m is None:
                    log_stats["groups/grad_cos"] = [plumbing.gradient_cosine(policy, pg_loss * d.world, gi_loss, d)]
                else:
                    (pg_loss * d.world + gi_loss).backward()
                loss_sum = loss_sum + (pg_loss * d.world + gi_loss).detach()
                with torch.no_grad():
                    sums[:5] += torch.stack([pg_loss * n_tok, torch.zeros(()),
                                             (0.5 * (new_logp - old_logp) ** 2 * r_mask).sum(),             # policy/approxkl
                                             (((ratio - 1).abs() > args.cliprange).float() * r_mask).sum(),  # policy/clipfrac
                                             (ent * r_mask).sum()])                                          # policy/entropy
            plumbing.optimizer_step(loss_sum, policy, opt_policy, log_stats, "ppo_gi policy", backward=False)

            # critic step: the clipped value loss − β_critic·R_var (θ's terms detached): φ ascends R_var.
            # With known groups there is no φ: the labels stand in for it, and only the values learn.
            p_rest = mb["probs"]
            if len(micros) > 1 and args.groups == "inferred":  # every row's p_φ as it is now, for the micro-batches' R_var
                with torch.no_grad():
                    p_rest = torch.cat([groups.group_probs(args, critic, rows("ids", u), rows("mask", u), P, None)[1] for u in micros])
            loss_sum = 0.0
            for m in micros:
                values, p_phi = groups.group_probs(args, critic, rows("ids", m), rows("mask", m), P, rows("probs", m).argmax(-1))
                v, old_v, r_mask = values[:, P - 1:-1], rows("values", m), rows("r_mask", m)
                vf_loss, r_var_phi = critic_loss(v, old_v, rows("returns", m), r_mask, G if args.j_form == "derived" else J, p_phi,
                                                 n_tok=n_tok, cliprange_value=args.cliprange_value, n_min=n_min, reduce=reduce,
                                                 micro=m, p_rest=p_rest)
                loss = vf_loss * d.world - (args.beta_critic * r_var_phi if phi_learns else 0.0)
                loss.backward()
                loss_sum = loss_sum + loss.detach()
                with torch.no_grad():
                    sums[1] += vf_loss * n_tok
                    sums[5] += (((v - old_v).abs() > args.cliprange_value).float() * r_mask).sum()  # val/clipfrac
            plumbing.optimizer_step(loss_sum, critic, opt_critic, log_stats, "ppo_gi critic", backward=False)

            with torch.no_grad():
                sums = plumbing.all_reduce_sum(sums, d) / n_tok
                # |w_i| relative to the PPO term's weight 1/B per trajectory: where β_policy·B·|w_i| > 1,
                # the group term outweighs PPO and reverses a best-group trajectory's update
                w_abs = plumbing.all_reduce_sum(torch.stack([w.abs().sum(), torch.ones_like(w).sum()]), d)
            for name, value in zip(names, sums.tolist()):
                log_stats.setdefault(name, []).append(value)
            log_stats.setdefault("groups/r_var_theta", []).append(r_var_theta.item())
            log_stats.setdefault("groups/r_var_phi", []).append(r_var_phi.item())
            log_stats.setdefault("groups/weight_abs_mean", []).append((w_abs[0] / w_abs[1] * args.minibatch).item())


def iteration_metrics(args, d, batch, stats, running, all_groups=()):
    """PPO diagnostics (names as in TRL / the N+ details) plus groups/* for this method."""
    r_mask = batch["r_mask"]
    seq_kl = (batch["kl"] * r_mask).sum(-1)
    rows = torch.stack([torch.ones_like(seq_kl), seq_kl, batch["raw"], batch["scores"] - args.kl_coef * batch["p_high"] * seq_kl,
                        batch["has_eos"].to(seq_kl.device), batch["p_high"], args.kl_coef * batch["p_high"]], -1)
    tot = plumbing.all_reduce_sum(rows.sum(0), d)
    n = tot[0]
    m = {"objective/kl": tot[1] / n, "objective/scores": tot[2] / n, "objective/rlhf_reward": tot[3] / n,
         "num_eos": tot[4] / n, "groups/p_high_mean": tot[5] / n, "groups/kl_weight": tot[6] / n}
    m = {k: v.item() for k, v in m.items()}
    ret, val = batch["returns"], batch["values"]
    ev = plumbing.all_reduce_sum(torch.stack([((ret - val) * r_mask).sum(), ((ret - val) ** 2 * r_mask).sum(),
                                              (ret * r_mask).sum(), (ret ** 2 * r_mask).sum(), r_mask.sum()]), d)
    var_err = ev[1] / ev[4] - (ev[0] / ev[4]) ** 2
    var_ret = ev[3] / ev[4] - (ev[2] / ev[4]) ** 2
    m["val/explained_variance"] = (1 - var_err / var_ret.clamp(min=1e-8)).item()
    m.update({k: sum(v) / len(v) for k, v in stats.items() if isinstance(v, list)})
    m["train/skipped"] = stats.get("skipped", 0)
    m["objective/running_std"] = running.std
    # groups/*: each inferred group's soft size, mean score and mean return (sequence return at t=0)
    probs = batch["probs"]
    sums = plumbing.all_reduce_sum(torch.cat([probs.sum(0), (probs * batch["scores"][:, None]).sum(0),
                                              (probs * ret[:, 0:1]).sum(0)]), d).view(3, -1)
    for g in range(args.n_groups):
        m[f"groups/size_{g}"] = sums[0, g].item()
        m[f"groups/score_{g}"] = (sums[1, g] / sums[0, g].clamp(min=1e-8)).item()
        m[f"groups/return_{g}"] = (sums[2, g] / sums[0, g].clamp(min=1e-8)).item()
    m["groups/g_high"] = batch["g_high"]
    if args.data == "toy":  # the gold judge on the sampled responses, per true group
        gold = [data.gold_score(p, t) for p, t in zip(batch["prompts"], batch["texts"])]
        m.update(plumbing.group_means("gold", gold, [data.true_group(p) for p in batch["prompts"]], data.GROUPS, d))
    if all_groups:  # the KL per group of the data: where the adaptive KL holds the policy, and where it lets go
        m.update(plumbing.group_means("kl", seq_kl.tolist(), batch["groups"], all_groups, d))
    if batch["judged"] is not None:  # --judge_reward: the watching reward model, per group of the data
        m.update(plumbing.group_means("judge", batch["judged"].tolist(), batch["groups"], all_groups, d))
    return m


def main(args):
    plumbing.check_model_dir(args.sft, "--sft", "lm")
    plumbing.check_reward_dir(args.reward, "--reward")
    if args.judge_reward:
        plumbing.check_reward_dir(args.judge_reward, "--judge_reward")
    d = plumbing.init_distributed()
    if args.minibatch > args.rollout_batch:
        parser.error(f"--batch_size (--minibatch) {args.minibatch} exceeds --rollout_batch {args.rollout_batch}: "
                     "a minibatch is part of one iteration's rollouts")
    if args.rollout_batch % (d.world * (args.rollout_batch // args.minibatch)) or args.rollout_batch % args.minibatch:
        parser.error(f"--rollout_batch {args.rollout_batch} must be a multiple of --minibatch {args.minibatch}, "
                     f"and each minibatch must split evenly over {d.world} ranks")
    if args.reward == "gold" and args.data != "toy":
        parser.error("--reward gold is the built-in task's judge: it needs --data toy")
    if args.max_len <= args.max_new_tokens:
        parser.error(f"--max_len {args.max_len} must exceed --max_new_tokens {args.max_new_tokens}: it holds the prompt too")
    if args.grad_accum > 1 and args.grad_cos:
        parser.error("--grad_cos 1 needs --grad_accum 1 (the diagnostic compares the two terms' gradients of one backward pass)")
    if args.grad_accum > 1 and args.j_form == "slide":
        parser.error("--grad_accum > 1 needs --j_form derived (the slide form's J_i of the other micro-batches is not known yet)")
    if not args.no_gi and args.groups == "inferred" and args.n_groups < 2:
        parser.error(f"--n_groups {args.n_groups}: GI-PPO needs at least 2 groups (with one, R_var is always 0; --no_gi is PPO)")
    bf16 = bool(args.bf16) if args.bf16 is not None else d.device.type == "cuda"
    plumbing.seed_everything(args.seed)
    records = data.load_prompts(args.data, args.split, group_by=args.group_by, need_group=args.groups == "known")
    prompts, labels = [x["prompt"] for x in records], None
    groups_of, all_groups = [x.get("group") for x in records], data.group_names([x for x in records if "group" in x])
    if args.groups == "known":  # label → index from the sorted names: the same on every rank
        names = data.group_names(records)
        if len(names) < 2 and not args.no_gi:
            parser.error(f"--groups known: {args.data} [{args.split}] has one group label ({names[0]}); GI-PPO needs at least 2")
        args.n_groups = len(names)
        labels = torch.tensor([names.index(x["group"]) for x in records])
    ckpt = plumbing.start_run(args, parser, d, MAY_CHANGE_ON_RESUME,
                              {"--sft": args.sft, "--reward": args.reward, "--judge_reward": args.judge_reward})
    tokenizer = plumbing.load_tokenizer(args.sft)
    if d.main:  # how many prompts --max_len − --max_new_tokens cuts (from the left)
        cut = sum(len(plumbing.encode(tokenizer, x)[0]) > args.max_len - args.max_new_tokens for x in prompts)
        plumbing.report_truncation("ppo_gi", collections.Counter(cut=cut), len(prompts), args.max_len, "prompts")
    # the reward models read the policy's token ids: the same tokenizer, or stop here
    plumbing.check_same_tokenizer({"--sft": tokenizer, **{f"--{k}": plumbing.load_tokenizer(getattr(args, k))
                                                          for k in ("reward", "judge_reward") if getattr(args, k) not in (None, "gold")}})
    policy = plumbing.load_model(os.path.join(ckpt, "policy") if ckpt else args.sft, tokenizer)
    reference = plumbing.load_model(args.sft, tokenizer, dtype=plumbing.frozen_dtype(d))
    critic_source = os.path.join(ckpt, "critic") if ckpt else (args.sft if args.reward == "gold" else args.reward)
    critic = groups.load_critic(critic_source, tokenizer, args.n_groups, seed=args.seed)
    # φ takes no step without the group term or with known groups: its head is frozen (no optimizer state to save)
    critic.group_head.requires_grad_(not args.no_gi and args.groups == "inferred")
    # dropout off everywhere (PPO_DETAILS 1): every model stays in eval mode, gradients still flow
    for model in (policy, reference, critic):
        plumbing.shard(model.eval(), d, bf16=bf16, checkpointing=args.gradient_checkpointing and model is not reference)
    reference.requires_grad_(False)
    scorer = reward.load_scorer(args.reward, tokenizer, d, bf16)
    judge = reward.load_scorer(args.judge_reward, tokenizer, d, bf16) if args.judge_reward else None
    opt_policy = plumbing.optimizer(policy, args.lr)  # AdamW, fused on CUDA
    opt_critic = plumbing.optimizer(critic, args.critic_lr)
    models, optimizers = {"policy": policy, "critic": critic}, {"policy": opt_policy, "critic": opt_critic}
    running, state = RunningStd(), {"step": 0}
    if ckpt:
        state = plumbing.load_optimizer_state(ckpt, models, optimizers, d)
        running.__dict__.update(state["running"])
    first = state["step"]
    log = plumbing.MetricsLog(os.path.join(args.out, "metrics.jsonl"), d, state, report_to=args.report_to)
    if d.main:
        variant = "PPO" + (" w/o KL" if args.kl_coef == 0 else " w/ KL") if args.no_gi else \
            "GI-PPO" + (" (fixed KL)" if args.fixed_kl else "") + (" (β_policy = 0)" if args.beta_policy == 0 else "")
        print(f"ppo_gi: {variant} from {args.sft} with reward {args.reward} on {args.data}/{args.split} "
              f"({len(prompts)} prompts), {d.world} process(es), iterations {first}..{args.steps}")
        if labels is not None:
            print("ppo_gi: known groups " + ", ".join(f"{g}={name}" for g, name in enumerate(names)))

    # updates this process will try: policy and critic, per minibatch and epoch, per iteration
    planned, skipped = 2 * args.ppo_epochs * (args.rollout_batch // args.minibatch) * (min(args.stop_at or args.steps, args.steps) - first), 0
    bar = plumbing.progress(range(first, args.steps), d, initial=first, total=args.steps, desc="ppo")
    for it in bar:
        idx = plumbing.batch_indices(it, args.rollout_batch, len(prompts), args.seed)
        mine = idx[d.rank::d.world]
        # learning rate: linear warm-up over --warmup iterations, then constant or cosine decay (--decay) to 10% at the last
        lr_scale = sft.lr_at(it, args.steps - 1, args.warmup, 1.0) if args.decay == "cosine" else min(1.0, (it + 1) / max(args.warmup, 1))
        for opt, lr in ((opt_policy, args.lr), (opt_critic, args.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = lr * lr_scale
        batch = rollout(args, d, policy, reference, critic, scorer, tokenizer, [prompts[i] for i in mine], it, running,
                        labels=None if labels is None else labels[mine], judge=judge, groups_of=[groups_of[i] for i in mine])
        stats, t_train = {}, time.perf_counter()
        ppo_update(args, d, policy, critic, opt_policy, opt_critic, batch, stats, it)
        skipped += stats.get("skipped", 0)
        plumbing.fail_if_mostly_skipped("ppo_gi", skipped, planned, args.max_skipped)
        perf = {**batch["perf"], "perf/train_s": time.perf_counter() - t_train, "perf/peak_rss_mb": plumbing.peak_rss_mb()}
        perf["perf/step_s"] = perf["perf/gen_s"] + perf["perf/score_s"] + perf["perf/train_s"]
        # tokens of all ranks: generated (response up to its EOS) and real (non-pad) prompt + response
        n_gen, n_seq = plumbing.all_reduce_sum(torch.stack([batch["r_mask"].sum().float(), batch["mask"].sum().float()]), d).tolist()
        perf["perf/gen_tokens_per_s"] = n_gen / max(perf["perf/gen_s"], 1e-9)
        perf.update(plumbing.perf_metrics(n_seq, perf["perf/step_s"], d.device))
        if (it + 1) % args.log_every == 0 or it == 0:
            m = iteration_metrics(args, d, batch, stats, running, all_groups)
            log.log(it + 1, {**m, **perf, "lr": opt_policy.param_groups[0]["lr"]})
            bar.set_postfix(score=f"{m['objective/scores']:.3f}", kl=f"{m['objective/kl']:.3f}")
        if args.sample_every and (it + 1) % args.sample_every == 0:  # a few of rank 0's samples, as a table
            seq_kl = (batch["kl"] * batch["r_mask"]).sum(-1).tolist()
            log.log_samples(it + 1, [{"prompt": p[-300:], "response": t, "score": round(s, 4), "group": g, "kl": round(k, 4)}
                                     for p, t, s, g, k in zip(batch["prompts"], batch["texts"], batch["raw"].tolist(),
                                                              batch["groups"], seq_kl)][:8])
        if it + 1 == args.steps and d.main:  # before the final checkpoint: a run resumed from it keeps them
            plumbing.write_jsonl(os.path.join(args.out, "rollouts.jsonl"), [{"prompt": p, "response": t, "reward": s} for p, t, s in
                                                                             zip(batch["prompts"], batch["texts"], batch["raw"].tolist())])
        if args.save_every and ((it + 1) % args.save_every == 0 or it + 1 in (args.steps, args.stop_at)):
            plumbing.save_checkpoint(args.out, it + 1, models, optimizers, tokenizer,
                                     {"step": it + 1, "running": dict(running.__dict__), "args": vars(args), "log_bytes": log.tell()}, d,
                                     keep=args.keep_checkpoints)
        if it + 1 == args.stop_at:
            if d.main:
                print(f"ppo_gi: stopped at iteration {it + 1} (--stop_at); continue with --resume")
            plumbing.close_distributed(d)
            return
    if args.data == "toy" and args.eval_prompts:
        test = [x["prompt"] for x in data.load_prompts("toy", f"{args.eval_split}[:{args.eval_prompts}]")]
        gold = sft.gold_by_group(policy, tokenizer, test, d)
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
