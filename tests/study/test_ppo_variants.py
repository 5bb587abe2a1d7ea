"""study/ppo_variants.py, study/diagnostics.py and study/inspect_groups.py: the study's variants
reach ppo_gi.py through its two seams (p(g|·) and the KL weight); each is checked against what it
claims: the rank weights by hand, groups of prompts shared by two responses, the known groups as
the inferred groups' hard-probability path, two processes = one, and an exact resume."""
import copy
import json

import pytest
import torch

import data
import groups
import plumbing
import ppo_gi
import reward
import toy
from conftest import read_metrics, run_script
from study import diagnostics, inspect_groups, ppo_variants

PPO_SHORT = ["--reward", "gold", "--rollout_batch", "16", "--minibatch", "8", "--max_new_tokens", "8", "--eval_prompts", "0"]


def test_rank_kl_weights_are_the_ranks():
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0])
    # ranks 3, 0, 1.5, 1.5 (a tie shares its mean rank), 4; divided by N − 1 = 4
    assert ppo_variants.rank_weights(scores, plumbing.Dist()).tolist() == [0.75, 0.0, 0.375, 0.375, 1.0]


def test_prompt_level_groups_are_the_same_for_two_responses_to_one_prompt(toy_sft_dir):
    tok = plumbing.load_tokenizer(toy_sft_dir)
    critic = groups.load_critic(toy_sft_dir, tok, 2, seed=0).eval()
    prompt, other = (x["prompt"] for x in data.load_prompts("toy", "rl[:2]"))
    p_ids = [plumbing.encode(tok, p)[0] for p in (prompt, prompt, other)]
    r_ids = [tok(r)["input_ids"] + [tok.eos_token_id] for r in (" moo", " lemon cloud river stone", " moo")]
    P = max(len(p) for p in p_ids)
    q, q_mask = plumbing.pad_batch(p_ids, tok.pad_token_id, left=True)
    r, r_mask = plumbing.pad_batch(r_ids, tok.pad_token_id)
    ids, mask = torch.cat([q, r], 1), torch.cat([q_mask, r_mask], 1)
    with torch.no_grad():
        by_prompt = ppo_variants.prompt_group_probs(critic, ids, mask, P, None)[1]
        by_response = groups.p_phi(critic, ids, mask, P)[1]
    assert torch.equal(by_prompt[0], by_prompt[1]) and not torch.allclose(by_prompt[0], by_prompt[2])
    assert not torch.allclose(by_response[0], by_response[1])  # the paper's p_φ(g|x, y) reads the response too


def test_known_groups_are_the_hard_probability_path_of_the_inferred_groups(toy_sft_dir):
    """--groups known: p(g|x) is the one-hot label, so g_high's samples get p_high = 1 and the rest 0
    (the adaptive KL as written); the θ step is the inferred groups' step with those probabilities,
    and φ takes no step (its head stays as it was)."""
    tok = plumbing.load_tokenizer(toy_sft_dir)
    records = data.load_prompts("toy", "rl[:16]")
    names = data.group_names(records)
    labels = torch.tensor([names.index(x["group"]) for x in records])
    args = ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--reward", "gold", "--rollout_batch", "16", "--minibatch", "16",
                                     "--max_new_tokens", "8", "--beta_policy", "1", "--n_groups", str(len(names))])
    known = ppo_variants.known_group_probs(names)
    policy, reference = plumbing.load_model(toy_sft_dir, tok).eval(), plumbing.load_model(toy_sft_dir, tok).eval()
    critic = groups.load_critic(toy_sft_dir, tok, args.n_groups, seed=0).eval()
    batch = ppo_gi.rollout(args, plumbing.Dist(), policy, reference, critic, reward.load_scorer("gold", tok, plumbing.Dist(), False),
                           tok, [x["prompt"] for x in records], 0, ppo_gi.RunningStd(), groups_of=[x["group"] for x in records],
                           group_probs=known)
    assert names == sorted(toy.GROUPS) and torch.equal(batch["probs"], torch.nn.functional.one_hot(labels, 4).float())
    assert batch["p_high"].tolist() == (labels == batch["g_high"]).float().tolist()
    after = {}
    for kind, group_probs in (("known", known), ("inferred", groups.p_phi)):
        pol, cri = copy.deepcopy(policy), copy.deepcopy(critic)
        opt_p, opt_c = torch.optim.SGD(pol.parameters(), lr=0.1), torch.optim.SGD(cri.parameters(), lr=0.1)
        ppo_gi.ppo_update(args, plumbing.Dist(), pol, cri, opt_p, opt_c, batch, {}, group_probs=group_probs)
        after[kind] = pol.state_dict(), cri.group_head.weight.detach().clone()
    assert all(torch.equal(after["known"][0][k], v) for k, v in after["inferred"][0].items())
    assert torch.equal(after["known"][1], critic.group_head.weight) and not torch.equal(after["inferred"][1], critic.group_head.weight)


@pytest.mark.slow
def test_known_groups_and_the_diagnostics_under_torchrun_equal_one_process(toy_sft_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run_script(["tests/ppo_update_check.py", toy_sft_dir, str(one), "known", "study"])
    run_script(["tests/ppo_update_check.py", toy_sft_dir, str(two), "known", "study"], nproc=2)
    a, b = torch.load(one / "state.pt"), torch.load(two / "state.pt")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 3e-5
    sa, sb = json.load(open(one / "stats.json")), json.load(open(two / "stats.json"))
    for k in ("policy/loss", "val/loss", "groups/r_var_theta", "groups/grad_cos", "groups/weight_abs_mean"):
        assert sa[k] == pytest.approx(sb[k], rel=1e-4, abs=1e-6), k


STUDY_VARIANTS = {"gi_prompt": ["--group_input", "prompt"], "gi_known": ["--groups", "known", "--min_group_frac", "0"],
                  "ppo_rank_kl": ["--no_gi", "--kl_weight", "rank"]}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(STUDY_VARIANTS))
def test_every_study_variant_resumes_to_the_uninterrupted_run(toy_sft_dir, tmp_path, variant):
    base = ["--sft", toy_sft_dir, "--steps", "4", "--save_every", "2", *PPO_SHORT, *STUDY_VARIANTS[variant]]
    for extra in (["--out", str(tmp_path / "full")], ["--out", str(tmp_path / "part"), "--stop_at", "2"],
                  ["--out", str(tmp_path / "part"), "--resume"]):
        ppo_variants.main(ppo_variants.parser.parse_args(base + extra))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s" and not k.startswith("perf/")} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "part" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    if variant == "gi_known":
        assert json.loads((tmp_path / "full" / "ppo_args.json").read_text())["n_groups"] == 4  # M: the toy's four labels


def test_inspect_groups_and_the_diagnostics_on_a_short_run(toy_sft_dir, tmp_path, capsys):
    out = str(tmp_path / "gi")
    ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", out, "--steps", "2", "--save_every", "0", *PPO_SHORT]))
    inspect_groups.main(inspect_groups.parser.parse_args(["--rollouts", f"{out}/rollouts.jsonl", "--critic", f"{out}/critic"]))
    printed = capsys.readouterr().out
    assert "group 0: soft size" in printed and "lookup" in printed  # the inferred groups against the true ones
    diagnostics.main(diagnostics.parser.parse_args(["--sft", toy_sft_dir, "--policy", out, *PPO_SHORT]))
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert -1 <= measured["groups/grad_cos"] <= 1 and measured["groups/weight_abs_mean"] > 0
