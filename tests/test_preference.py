"""reward.py and dpo.py: losses against hand-computed values, the reward read-out under both
paddings, learning on the built-in task, real HH-RLHF data, torchrun and resume."""
import math
import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import data
import dpo
import plumbing
import reward
import toy
from conftest import needs_shared, read_metrics, run_script, shared

SHORT = ["--batch_size", "16", "--log_every", "1", "--eval_every", "1000", "--warmup", "2"]


def test_bradley_terry_loss_by_hand():
    loss = reward.bradley_terry_loss(torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.5, 0.0, 3.0]))
    expected = [math.log(1 + math.exp(-1.5)), math.log(2.0), math.log(1 + math.exp(4.0))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)


def test_dpo_loss_by_hand():
    # log-ratios: chosen -10 - (-11) = 1, rejected -12 - (-11) = -1; beta 0.1 -> margin 0.2
    loss, rc, rr = dpo.dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-6)
    # both log-probs falling can still lower the loss, if the rejected one falls further
    loss2, _, _ = dpo.dpo_loss(torch.tensor([-12.0]), torch.tensor([-20.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1)
    assert loss2 < loss


def test_pair_logprobs_equal_a_full_log_softmax_per_sequence():
    # dpo.pair_logprobs keeps logits for response positions only and takes z[a] − logsumexp(z); the
    # straightforward way: each sequence alone, a full log_softmax, the response tokens' entries summed
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    examples = [([5, 6, 7], [8, 9, 1], [5, 6, 7], [10, 1]), ([11, 12, 13, 14, 15], [16, 1], [11, 12, 13, 14, 15], [17, 18, 19, 1])]
    chosen, rejected = dpo.pair_logprobs(model, examples, pad_id=0, device="cpu")
    for got, (p, r) in zip([*chosen, *rejected], [(p, c) for p, c, _, _ in examples] + [(p, r) for _, _, p, r in examples]):
        logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0], -1)
        expected = sum(logp[len(p) + j - 1, t] for j, t in enumerate(r))
        assert got.item() == pytest.approx(expected.item(), abs=1e-4)


def test_last_token_index_by_hand():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert reward.last_token_index(mask).tolist() == [2, 4, 4, 1]


def test_reward_head_reads_the_last_real_token_under_left_and_right_padding():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, pad_token_id=0, num_labels=1)
    model = reward.RewardModel(LlamaForSequenceClassification(config)).eval()
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    alone = torch.stack([reward.sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
    # the same scalar is the per-token value at the last position of the unpadded sequence
    last_values = torch.stack([model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1] for s in seqs])
    assert torch.allclose(alone, last_values)
    for left in (False, True):
        ids, mask = plumbing.pad_batch(seqs, pad_id=0, left=left)
        batched = reward.sequence_rewards(model, ids, mask)
        assert torch.allclose(batched, alone, atol=1e-5), (left, batched, alone)
        ids[mask == 0] = 42  # what sits in the padding does not matter
        assert torch.allclose(reward.sequence_rewards(model, ids, mask), alone, atol=1e-5)


def test_score_accepts_a_rule():
    prompts = [data.load_prompts("toy", "test[:2]")[i]["prompt"] for i in range(2)]
    got = reward.score(toy.gold_score, None, prompts, [" apple", " banana"])
    assert got.tolist() == [toy.gold_score(prompts[0], " apple"), toy.gold_score(prompts[1], " banana")]


@pytest.mark.slow
def test_reward_model_learns_the_builtin_task(toy_sft_dir, tmp_path):
    out = str(tmp_path / "rm")
    reward.main(reward.parser.parse_args(["--sft", toy_sft_dir, "--out", out, "--steps", "80", "--batch_size", "32",
                                          "--save_every", "0", "--eval_every", "1000", "--stats_pairs", "256"]))
    final = read_metrics(os.path.join(out, "metrics.jsonl"))[-1]
    print(f"held-out RM accuracy after 80 steps: {final['eval/accuracy']:.3f}")
    assert final["eval/accuracy"] > 0.7  # chance is 0.5; label noise and the length-biased summary labels keep it near 0.8 (RESULTS.md)
    assert {"eval/reward/skewness", "eval/reward/q95", "eval/reward/harmful/mean", "eval/accuracy/lookup"} <= final.keys()
    # the saved directory reloads with plain transformers and gives the same scores
    tok = plumbing.load_tokenizer(out)
    hf = AutoModelForSequenceClassification.from_pretrained(out)
    pairs = data.load_pairs("toy", "test[:8]")
    ours = reward.score(reward.RewardModel(hf), tok, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    reloaded = reward.score(reward.load_reward_model(out, tok), tok, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    assert torch.allclose(ours, reloaded)
    stats = __import__("json").load(open(os.path.join(out, "reward_stats.json")))
    assert stats["n_scores"] == 512 and stats["std"] > 0


@pytest.mark.slow
def test_dpo_raises_the_margin_on_the_builtin_task(toy_sft_dir, tmp_path):
    out = str(tmp_path / "dpo")
    dpo.main(dpo.parser.parse_args(["--sft", toy_sft_dir, "--out", out, "--steps", "30", "--batch_size", "32",
                                    "--eval_every", "30", "--save_every", "0", "--gold_prompts", "0", "--log_every", "1"]))
    log = read_metrics(os.path.join(out, "metrics.jsonl"))
    first_train = next(r for r in log if "train/rewards/margin" in r)
    assert first_train["train/rewards/margin"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at step 0
    evals = [r["eval/rewards/margin"] for r in log if "eval/rewards/margin" in r]
    print(f"DPO held-out margin: {evals}")  # 0 before training (policy == reference)
    assert evals[-1] > 0.05 and log[-1]["eval/rewards/accuracy"] > 0.6


@needs_shared
@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_short_runs_on_real_hh_rlhf(toy_sft_dir, tmp_path, stage):
    module = {"reward": reward, "dpo": dpo}[stage]
    out = str(tmp_path / stage)
    # the 8,552-pair test split is all we have: carve 5% of its first 64 pairs as held-out
    module.main(module.parser.parse_args(["--sft", toy_sft_dir, "--data", shared("data", "hh-rlhf"), "--split", "test[:64]",
                                          "--out", out, "--steps", "3", "--max_len", "256", "--save_every", "0", *SHORT]
                                         + (["--gold_prompts", "0"] if stage == "dpo" else ["--stats_pairs", "16"])))
    log = read_metrics(os.path.join(out, "metrics.jsonl"))
    losses = [r["train/loss"] for r in log if "train/loss" in r] + [log[-1]["eval/loss" if stage == "dpo" else "eval/margin"]]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def _assert_same(a, b, key, tol=1e-5, weight_tol=3e-5):
    """Same losses to `tol`; same weights to `weight_tol`. Adam divides by sqrt(v): where a gradient
    element is tiny, summation-order noise (~1e-7) moves its update by ~1e-5 after a few steps."""
    la = [r[key] for r in read_metrics(os.path.join(a, "metrics.jsonl")) if key in r]
    lb = [r[key] for r in read_metrics(os.path.join(b, "metrics.jsonl")) if key in r]
    assert len(la) == len(lb) > 0 and la == pytest.approx(lb, rel=tol, abs=tol)
    from safetensors.torch import load_file
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < weight_tol, worst


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_torchrun_two_processes_equal_one_and_resume(toy_sft_dir, tmp_path, stage):
    extra = ["--gold_prompts", "0"] if stage == "dpo" else ["--stats_pairs", "64"]
    base = [f"{stage}.py", "--sft", toy_sft_dir, "--split", "train[:256]", "--eval_split", "test[:32]", "--steps", "6", *SHORT, *extra]
    # 1 process for 3 of 6 steps, resumed under 2 processes = 1 process throughout (the exact
    # resume of the loop these trainers share with SFT: tests/test_sft.py)
    one, part = str(tmp_path / "one"), str(tmp_path / "part")
    run_script(base + ["--out", one, "--save_every", "0"])
    run_script(base + ["--out", part, "--save_every", "3", "--stop_at", "3"])
    run_script(base + ["--out", part, "--save_every", "3", "--resume"], nproc=2)
    _assert_same(one, part, "train/loss")
