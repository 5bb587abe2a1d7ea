"""groups.py and ppo_gi.py: GAE, group returns and R_var against independent implementations,
the two players' gradients, the adaptive KL reward, torchrun, resume, and end-to-end runs."""
import json
import os
import re

import numpy as np
import pytest
import torch

import data
import groups
import plumbing
import ppo_gi
from conftest import read_metrics, run_script


def _gae_reference(rewards, values, lengths, gamma, lam):
    """A second implementation: A_t = Σ_l (γλ)^l δ_{t+l}, written as an explicit double loop per row."""
    adv = np.zeros_like(rewards)
    for b, n in enumerate(lengths):
        v = list(values[b, :n]) + [0.0]
        deltas = [rewards[b, t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[b, t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t))
    ret = adv + np.where(np.arange(rewards.shape[1])[None] < np.array(lengths)[:, None], values, 0.0)
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_an_independent_implementation_on_ragged_masks(gamma, lam):
    rng = np.random.default_rng(0)
    lengths = [5, 1, 3, 7]
    rewards, values = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    mask = (np.arange(7)[None] < np.array(lengths)[:, None]).astype(np.float64)
    rewards = rewards * mask
    adv, ret = ppo_gi.gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), gamma, lam)
    ref_adv, ref_ret = _gae_reference(rewards, values, lengths, gamma, lam)
    assert np.allclose(adv.numpy(), ref_adv * mask) and np.allclose(ret.numpy(), ref_ret * mask)
    if gamma == lam == 1.0:  # closed form: A_t = Σ_{k≥t} r_k − V_t, and the return is the reward-to-go
        to_go = np.flip(np.cumsum(np.flip(rewards, 1), 1), 1)
        assert np.allclose(adv.numpy(), (to_go - values) * mask) and np.allclose(ret.numpy(), to_go * mask)


def test_group_returns_and_variance_against_numpy():
    rng = np.random.default_rng(1)
    j = rng.normal(size=10)
    hard = np.zeros((10, 3))
    hard[np.arange(10), rng.integers(0, 3, 10)] = 1
    hard[0] = [1, 0, 0]; hard[1] = [0, 1, 0]; hard[2] = [0, 0, 1]  # noqa: E702  every group non-empty
    means = np.array([j[hard[:, g] == 1].mean() for g in range(3)])
    got = groups.group_returns(torch.tensor(j), torch.tensor(hard))
    assert np.allclose(got.numpy(), means) and groups.variance_penalty(got).item() == pytest.approx(np.var(means))
    soft = rng.dirichlet(np.ones(3), size=10)
    weighted = np.array([np.average(j, weights=soft[:, g]) for g in range(3)])
    got = groups.group_returns(torch.tensor(j), torch.tensor(soft))
    assert np.allclose(got.numpy(), weighted) and groups.variance_penalty(got).item() == pytest.approx(np.var(weighted))
    assert groups.variance_penalty(torch.tensor([2.0, 2.0])).item() == 0.0


def test_min_group_size_shrinks_a_near_empty_group_and_keeps_phi_from_isolating_an_outlier():
    j = torch.tensor([10.0] + [0.5, -0.5] * 7 + [0.0])  # one outlier among 16 small terms
    alone = torch.zeros(16, 2)
    alone[0, 0], alone[1:, 1] = 1.0, 1.0  # group 0 = the outlier alone
    assert groups.group_returns(j, alone).tolist() == pytest.approx([10.0, 0.0])
    assert groups.group_returns(j, alone, min_size=8.0).tolist() == pytest.approx([10.0 / 8, 0.0])
    # φ ascends R_var from a uniform start: plain soft means empty a group, the fair-share floor does not
    sizes = {}
    for n_min in (0.0, 8.0):
        logits = torch.zeros(16, 2, requires_grad=True)
        with torch.no_grad():
            logits[:, 0] += 0.01 * torch.arange(16.0).sin()  # break the symmetry
        opt = torch.optim.Adam([logits], lr=0.1)
        for _ in range(300):
            loss = -groups.variance_penalty(groups.group_returns(j, logits.softmax(-1), min_size=n_min))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sizes[n_min] = logits.softmax(-1).sum(0).min().item()
    assert sizes[0.0] < 1.5 and sizes[8.0] > 4.0, sizes


def test_adaptive_kl_rewards_scale_with_p_high_and_score_lands_on_the_last_real_token():
    eos, pad = 9, 0
    resp = torch.tensor([[4, 5, eos, pad, pad], [4, 5, 6, 7, 8]])  # with EOS, and cut off without one
    mask = ppo_gi.response_mask(resp, eos).float()
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    kl = torch.full((2, 5), 0.5) * mask
    scores = torch.tensor([2.0, -1.0])
    for p, expected_penalty in ((0.0, 0.0), (1.0, 0.1 * 0.5), (0.5, 0.05 * 0.5)):
        r = ppo_gi.adaptive_kl_rewards(scores, kl, mask, torch.full((2,), p), eta=0.1)
        penalty = -expected_penalty * mask
        expected = penalty.clone()
        expected[0, 2] += 2.0  # the EOS
        expected[1, 4] += -1.0  # the last token of a response with no EOS
        assert torch.allclose(r, expected), (p, r)
    k3 = ppo_gi.kl_per_token(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), "k3")
    assert (k3 >= 0).all() and k3[0].item() == pytest.approx(np.exp(-0.5) - 1 + 0.5)


@pytest.fixture(scope="module")
def rollout_batch(toy_sft_dir):
    args = ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--reward", "gold", "--rollout_batch", "16", "--minibatch", "16",
                                     "--max_new_tokens", "10"])
    tok = plumbing.load_tokenizer(toy_sft_dir)
    policy, reference = plumbing.load_model(toy_sft_dir, tok).eval(), plumbing.load_model(toy_sft_dir, tok).eval()
    critic = groups.load_critic(toy_sft_dir, tok, 2, seed=0).eval()
    prompts = [x["prompt"] for x in data.load_prompts("toy", "rl[:16]")]
    batch = ppo_gi.rollout(args, plumbing.Dist(), policy, reference, critic, "gold", tok, prompts, 0, ppo_gi.RunningStd())
    return args, policy, critic, batch


def _r_var_theta(args, policy, batch, probs):
    idx = torch.arange(batch["ids"].shape[0])
    new_logp, _ = ppo_gi.response_logprobs(policy, batch["ids"], batch["mask"], batch["P"], args.temperature)
    j_theta, j_phi = ppo_gi.per_trajectory_terms(args, new_logp, batch, idx, (new_logp - batch["logp"]).exp())
    return groups.variance_penalty(groups.group_returns(j_theta, probs)), j_phi


def test_phi_step_raises_r_var_theta_step_lowers_it_and_gradients_stay_with_their_player(rollout_batch):
    args, policy, critic, batch = rollout_batch
    for p in list(policy.parameters()) + list(critic.parameters()):
        p.grad = None
    # θ step: p_φ fixed (detached) -> no gradient reaches the critic / group head
    with torch.no_grad():
        probs = critic(batch["ids"], batch["mask"])[1].softmax(-1)
    r_var, j_phi = _r_var_theta(args, policy, batch, probs)
    r_var.backward()
    assert all(p.grad is None for p in critic.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    with torch.no_grad():
        for p in policy.parameters():
            p -= 1e-4 * p.grad / (p.grad.norm() + 1e-12)
            p.grad = None
    r_var_after, _ = _r_var_theta(args, policy, batch, probs)
    assert r_var_after.item() < r_var.item()
    # φ step: J_i detached -> no gradient reaches the policy; ascending raises R_var
    phi = groups.variance_penalty(groups.group_returns(j_phi, critic(batch["ids"], batch["mask"])[1].softmax(-1)))
    (-phi).backward()
    assert all(p.grad is None for p in policy.parameters())
    assert critic.group_head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in critic.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad / (p.grad.norm() + 1e-12)
                p.grad = None
    phi_after = groups.variance_penalty(groups.group_returns(j_phi, critic(batch["ids"], batch["mask"])[1].softmax(-1)))
    assert phi_after.item() > phi.item()


def test_one_ppo_update_under_torchrun_equals_one_process(toy_sft_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run_script(["tests/ppo_update_check.py", toy_sft_dir, str(one)])
    run_script(["tests/ppo_update_check.py", toy_sft_dir, str(two)], nproc=2)
    a, b = torch.load(one / "state.pt"), torch.load(two / "state.pt")
    assert a.keys() == b.keys() and any(k.startswith("critic.group_head") for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 3e-5, worst
    sa, sb = json.load(open(one / "stats.json")), json.load(open(two / "stats.json"))
    assert sa["generated"] == sb["generated"]  # sharded and unsharded generation agree (PPO_DETAILS 16)
    for k in ("policy/loss", "val/loss", "groups/r_var_theta", "groups/r_var_phi"):
        assert sa[k] == pytest.approx(sb[k], rel=1e-4, abs=1e-6), k


def test_left_padded_batched_generation_equals_one_prompt_at_a_time(toy_sft_dir):
    """Position ids from the attention mask make left padding invisible (PPO_DETAILS 3)."""
    tok = plumbing.load_tokenizer(toy_sft_dir)
    model = plumbing.load_model(toy_sft_dir, tok).eval()
    prompts = [x["prompt"] for x in data.load_prompts("toy", "test[:10]")]  # lengths differ: padding
    _, mask, resp, batched = plumbing.generate(model, tok, prompts, max_new_tokens=10)
    assert (mask == 0).any()
    alone = [plumbing.generate(model, tok, [p], max_new_tokens=10)[3][0] for p in prompts]
    assert batched == alone
    eos_rows = (resp == tok.eos_token_id).any(-1)
    for row in resp[eos_rows]:  # everything after the first EOS is pad (PPO_DETAILS 4)
        first = (row == tok.eos_token_id).nonzero()[0, 0]
        assert (row[first + 1:] == tok.pad_token_id).all()


PPO_SHORT = ["--reward", "gold", "--rollout_batch", "16", "--minibatch", "8", "--max_new_tokens", "12", "--eval_prompts", "0"]


def test_resume_equals_uninterrupted(toy_sft_dir, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    base = ["--sft", toy_sft_dir, "--steps", "4", *PPO_SHORT]
    ppo_gi.main(ppo_gi.parser.parse_args(base + ["--out", full, "--save_every", "0"]))
    ppo_gi.main(ppo_gi.parser.parse_args(base + ["--out", part, "--save_every", "2", "--stop_at", "2"]))
    ppo_gi.main(ppo_gi.parser.parse_args(base + ["--out", part, "--save_every", "2", "--resume"]))
    la, lb = read_metrics(os.path.join(full, "metrics.jsonl")), read_metrics(os.path.join(part, "metrics.jsonl"))
    for key in ("objective/scores", "objective/kl", "policy/loss", "groups/r_var_theta"):
        assert [r[key] for r in la] == pytest.approx([r[key] for r in lb], rel=1e-5, abs=1e-6), key
    from safetensors.torch import load_file
    wa, wb = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(part, "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_end_to_end_variants_on_the_builtin_task(toy_sft_dir, tmp_path, capsys):
    """GI-PPO and PPO with KL each run a short schedule from the same SFT model with the trained
    reward model; their gold scores are reported next to SFT's, not asserted: at this budget (8
    iterations of 32 samples from a 150-step SFT model) no variant reliably beats SFT. PPO with the
    gold judge as its reward must beat SFT: the built-in task leaves RL room (task v2). Measured
    on a shared 2-core CPU, PPO seeds 1/2/3 from this SFT: greedy gold on 100 test prompts
    0.454 → 0.547/0.569/0.525 (+0.093/+0.115/+0.071); asserted: +0.04."""
    import reward
    import sft
    rm = str(tmp_path / "rm")
    reward.main(reward.parser.parse_args(["--sft", toy_sft_dir, "--out", rm, "--steps", "50", "--batch_size", "32",
                                          "--eval_split", "test[:64]", "--save_every", "0", "--eval_every", "1000", "--stats_pairs", "256"]))
    test = [x["prompt"] for x in data.load_prompts("toy", "test[:100]")]
    tok = plumbing.load_tokenizer(toy_sft_dir)
    sft_gold = sft.gold_by_group(plumbing.load_model(toy_sft_dir, tok), tok, test, plumbing.Dist())
    results = {"SFT": sum(sft_gold.values()) / len(sft_gold)}
    gold_reward = ["--no_gi", "--reward", "gold", "--minibatch", "16", "--lr", "1e-4"]
    for name, flags in (("GI-PPO", []), ("PPO w/ KL", ["--no_gi"]), ("PPO (gold reward)", gold_reward)):
        out = str(tmp_path / re.sub(r"\W+", "_", name))
        ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--reward", rm, "--out", out, "--steps", "8",
                                              "--rollout_batch", "32", "--minibatch", "8", "--max_new_tokens", "16",
                                              "--eval_prompts", "100", "--save_every", "0", *flags]))
        log = read_metrics(os.path.join(out, "metrics.jsonl"))
        assert all(np.isfinite(r["policy/loss"]) for r in log if "policy/loss" in r)
        assert os.path.exists(os.path.join(out, "critic", "extra_heads.pt"))
        results[name] = log[-1]["eval/gold_mean"]
        if name == "GI-PPO":
            assert {"groups/size_0", "groups/size_1", "groups/r_var_theta", "groups/p_high_mean", "gold/lookup"} <= log[0].keys()
            rollouts = os.path.join(out, "rollouts.jsonl")
            groups.main(groups.parser.parse_args(["--rollouts", rollouts, "--critic", os.path.join(out, "critic")]))
            printed = capsys.readouterr().out
            assert "group 0: soft size" in printed and "lookup" in printed
    with capsys.disabled():
        print("\ngreedy gold on 100 test prompts: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    assert all(0.0 <= v <= 1.0 for v in results.values())
    assert results["PPO (gold reward)"] > results["SFT"] + 0.04
