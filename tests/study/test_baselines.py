"""The baselines users would pick instead (study/ppo_variants.py), each against something written
independently: RLOO's advantages against a loop over prompts by hand, UWO and WCO against numpy on
made-up scores, PAR's reward on a hand case; and each runs through ppo_gi.main's seams."""
import json
import math

import numpy as np
import pytest
import torch

import groups
import plumbing
import ppo_gi
import reward
from conftest import read_metrics
from study import ppo_variants

PPO_SHORT = ["--rollout_batch", "16", "--minibatch", "16", "--max_new_tokens", "8", "--eval_prompts", "0", "--steps", "2", "--save_every", "0"]


def test_rloo_advantages_are_each_samples_reward_less_the_mean_of_the_others():
    k, rewards = 3, torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0],   # prompt 1: R = 1.5, 2.0, 1.0
                                  [0.0, 0.0, -1.0], [0.0, 0.0, 3.0], [0.0, 0.5, 0.5]])  # prompt 2: R = −1, 3, 0.5 (its last token is padding)
    r_mask = torch.tensor([[1.0, 1.0, 1.0]] * 5 + [[1.0, 1.0, 0.0]])
    rewards = rewards * r_mask
    adv, _ = ppo_variants.RLOO(k).advantages(None, rewards, None, r_mask, plumbing.Dist())
    expected = []
    for prompt in range(2):  # by hand: each sample against the mean of its prompt's other samples
        R = [float(rewards[prompt * k + i].sum()) for i in range(k)]
        expected += [R[i] - sum(R[j] for j in range(k) if j != i) / (k - 1) for i in range(k)]
    assert expected == pytest.approx([1.5 - 1.5, 2.0 - 1.25, 1.0 - 1.75, -1.0 - 1.75, 3.0 - (-0.25), 0.5 - 1.0])
    assert torch.allclose(adv, torch.tensor(expected)[:, None] * r_mask)  # every token of a sample, masked


def test_uwo_and_wco_against_numpy_on_made_up_scores():
    rng = np.random.default_rng(0)
    raw, means, stds = rng.normal(size=(4, 7)), rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)

    class Member:  # a reward model's scorer: fixed raw scores, centred by its training-pairs mean
        def __init__(self, k):
            self.k, self.center, self.std = k, float(means[k]), float(stds[k])

        def __call__(self, prompts, texts, ids, mask):
            return torch.tensor(raw[self.k])

    members = [Member(k) for k in range(4)]
    normalized = (raw - means[:, None]) / stds[:, None]
    for mode, expected in (("uwo", normalized.mean(0) - 0.5 * normalized.var(0)), ("wco", normalized.min(0))):
        load = ppo_variants.ensemble_scorer(["m1", "m2", "m3"], mode, 0.5)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(reward, "load_scorer", lambda spec, *a: members[int(spec[1])])
            scorer = load("m0", None, plumbing.Dist(), False)
        assert scorer.center == 0.0
        assert np.allclose(scorer(None, None, torch.zeros(7, 2), None).numpy(), expected), mode


def test_par_reward_on_a_hand_case(monkeypatch):
    """σ(r(x, y) − r(x, y_ref)): a response the reward model scores 2.0 against a reference it scores 0.5
    gets σ(1.5); an equal one σ(0) = 0.5, the centre; the reference is the SFT policy's greedy response."""
    calls = []
    monkeypatch.setattr(reward, "load_reward_model", lambda spec, tok, **kw: torch.nn.Linear(1, 1))
    monkeypatch.setattr(plumbing, "load_model", lambda spec, tok, **kw: torch.nn.Linear(1, 1))
    monkeypatch.setattr(plumbing, "generate", lambda model, tok, prompts, **kw: calls.append(prompts) or (None, None, None, [f"ref of {p}" for p in prompts]))
    monkeypatch.setattr(reward, "score", lambda rm, tok, prompts, responses, max_len: torch.tensor([0.5 if "a" in r else -1.0 for r in responses]))
    monkeypatch.setattr(reward, "sequence_rewards", lambda rm, ids, mask: torch.tensor([2.0, -1.0, 0.5])[:len(ids)])
    args = ppo_variants.parser.parse_args(["--sft", "s", "--par"])
    scorer = ppo_variants.par_scorer(args)("rm", None, plumbing.Dist(), False)
    got = scorer(["a", "b", "a"], ["y1", "y2", "y3"], torch.zeros(3, 2), None)
    assert got.tolist() == pytest.approx([1 / (1 + math.exp(-1.5)), 0.5, 0.5]) and scorer.center == 0.5
    assert calls == [["a", "b"]]  # each prompt's reference generated once
    scorer(["b", "c"], ["y", "y"], torch.zeros(2, 2), None)
    assert calls == [["a", "b"], ["c"]]


@pytest.mark.parametrize("variant", [["--estimator", "rloo", "--no_gi"], ["--estimator", "rloo", "--beta_policy", "1"],
                                     ["--par", "--no_gi"]], ids=["rloo", "gi_rloo", "par"])
def test_each_baseline_trains_through_the_seams(toy_sft_dir, tmp_path, variant, monkeypatch):
    calls = []
    forward = groups.Critic.forward
    monkeypatch.setattr(groups.Critic, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    rm = str(tmp_path / "rm")
    tok = plumbing.load_tokenizer(toy_sft_dir)
    plumbing.save_model(reward.load_reward_model(toy_sft_dir, tok), tok, rm, plumbing.Dist(), extra={"reward_stats.json": {"mean": 0.0, "std": 1.0}})
    out = tmp_path / "run"
    ppo_variants.main(ppo_variants.parser.parse_args(["--sft", toy_sft_dir, "--reward", rm, "--out", str(out), *PPO_SHORT, *variant]))
    log = [r for r in read_metrics(out / "metrics.jsonl") if "objective/kl" in r]
    assert len(log) == 2 and all(math.isfinite(r["policy/loss"]) for r in log)
    if "rloo" in variant:  # no value head learns; with the group term, φ (the critic's head) still steps
        assert ("val/loss" in log[0]) == ("--beta_policy" in variant)
        assert json.loads((out / "ppo_args.json").read_text())["estimator"] == "rloo"
        assert bool(calls) == ("--beta_policy" in variant)  # without the group term the critic network is never run
    else:  # PAR's reward lies in (0, 1)
        assert all(0 < r["objective/scores"] < 1 for r in log)


def test_rloo_samples_each_prompt_k_times_side_by_side(toy_sft_dir, monkeypatch, tmp_path):
    seen = []
    rollout = ppo_gi.rollout
    monkeypatch.setattr(ppo_gi, "rollout", lambda *a, **k: seen.append(a[7]) or rollout(*a, **k))
    ppo_variants.main(ppo_variants.parser.parse_args(["--sft", toy_sft_dir, "--reward", "gold", "--out", str(tmp_path / "r"), *PPO_SHORT,
                                                      "--estimator", "rloo", "--rloo_k", "4", "--no_gi"]))
    prompts = seen[0]
    assert len(prompts) == 16 and all(prompts[i] == prompts[i - i % 4] for i in range(16)) and len(set(prompts)) == 4
