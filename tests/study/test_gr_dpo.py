"""study/gr_dpo.py: the group weights' step by hand, equal losses leave them uniform whatever the
group sizes, one group is DPO exactly, and a resumed run continues the weights exactly."""
import json
import math

import pytest
import torch

import data
import dpo
from conftest import read_metrics
from study import gr_dpo

SHORT = ["--batch_size", "16", "--log_every", "1", "--eval_every", "1000", "--warmup", "2"]


def test_gr_dpo_weights_move_to_the_group_with_the_higher_loss_by_hand():
    alpha = gr_dpo.group_weights_step(torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.2], dtype=torch.float64),
                                   torch.ones(2, dtype=torch.float64), 0.5)
    # α ∝ (0.5·e^0.5, 0.5·e^0.1) = (0.8244, 0.5526), normalized: (0.5987, 0.4013)
    assert alpha.tolist() == pytest.approx([math.exp(0.5) / (math.exp(0.5) + math.exp(0.1)), math.exp(0.1) / (math.exp(0.5) + math.exp(0.1))])
    assert alpha[0] > 0.5 > alpha[1]
    # a group absent from the batch keeps its weight, the present ones share the rest: (0.2, 0.3·e^0.3, 0.5·e^0.1) → 0.8 in all
    kept = gr_dpo.group_weights_step(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), torch.tensor([9.0, 0.6, 0.2], dtype=torch.float64),
                                  torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), 0.5)
    z = 0.3 * math.exp(0.3) + 0.5 * math.exp(0.1)
    assert kept.tolist() == pytest.approx([0.2, 0.8 * 0.3 * math.exp(0.3) / z, 0.8 * 0.5 * math.exp(0.1) / z])


def test_gr_dpo_with_equal_losses_leaves_the_weights_uniform_whatever_the_group_sizes():
    """A 1% group is absent from most batches; equal losses must not move weight to the majority
    (before: its α fell from 0.5 to 0.005 in 80 steps)."""
    rng = torch.Generator().manual_seed(0)
    alpha = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for _ in range(80):  # batches of 16 from a 99 : 1 population
        counts = torch.bincount((torch.rand(16, generator=rng) < 0.01).long(), minlength=2).double()
        alpha = gr_dpo.group_weights_step(alpha, torch.full((2,), 0.69, dtype=torch.float64), (counts > 0).double(), 0.1)
    assert alpha.tolist() == pytest.approx([0.5, 0.5], abs=1e-12)


@pytest.mark.slow
def test_gr_dpo_with_one_group_is_dpo_exactly_and_resumes(toy_sft_dir, tmp_path):
    one = tmp_path / "pairs.jsonl"
    one.write_text("".join(json.dumps({**p, "group": "all"}) + "\n" for p in data.load_pairs("toy", "train[:256]")))
    base = ["--sft", toy_sft_dir, "--data", str(one), "--split", "all", "--eval_split", "all[:32]", "--steps", "4",
            "--save_every", "0", "--gold_prompts", "0", *SHORT]
    dpo.main(dpo.parser.parse_args(base + ["--out", str(tmp_path / "dpo")]))
    gr_dpo.main(gr_dpo.parser.parse_args(base + ["--out", str(tmp_path / "gr")]))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("perf/", "time_s", "robust/"))} for r in rows]  # noqa: E731
    a, b = read_metrics(tmp_path / "dpo" / "metrics.jsonl"), read_metrics(tmp_path / "gr" / "metrics.jsonl")
    assert strip(a) == strip(b) and b[1]["robust/alpha/all"] == 1.0
    # four groups: the weights leave the uniform start, and a resumed run continues them exactly
    four = ["--sft", toy_sft_dir, "--steps", "4", "--save_every", "2", "--gold_prompts", "0",
            "--robust_step", "1", "--eval_split", "test[:32]", *SHORT]
    gr_dpo.main(gr_dpo.parser.parse_args(four + ["--out", str(tmp_path / "full")]))
    gr_dpo.main(gr_dpo.parser.parse_args(four + ["--out", str(tmp_path / "part"), "--stop_at", "2"]))
    gr_dpo.main(gr_dpo.parser.parse_args(four + ["--out", str(tmp_path / "part"), "--resume"]))
    alphas = lambda path: [{k: v for k, v in r.items() if k.startswith("robust/alpha")} for r in read_metrics(path) if "robust/alpha/copy" in r]  # noqa: E731
    full = alphas(tmp_path / "full" / "metrics.jsonl")
    assert full[-1] != {k: 0.25 for k in full[-1]} and abs(sum(full[-1].values()) - 1) < 1e-6
    assert alphas(tmp_path / "part" / "metrics.jsonl")[-1] == pytest.approx(full[-1])
