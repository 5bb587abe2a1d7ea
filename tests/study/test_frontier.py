"""study/frontier.py and study/frontier.sh: the interpolation along a sweep by hand, the verdict and
the report on synthetic measurements whose answer is known, and the driver on a tiny pipeline."""
import json
import math
import os
import shutil

import numpy as np
import pytest

import data
import toy
from conftest import run_pipeline
from study import frontier

GROUP_OF = [toy.true_group(x["prompt"]) for x in data.load_prompts("toy", "test[:200]")]


def _measured(kl, gold_per_group, summary=0.5):
    """A synthetic measurement: every test prompt of a group gets that group's gold."""
    items = [gold_per_group[g] for g in GROUP_OF]
    split = {"gold": float(np.mean(items)), "worst": min(gold_per_group.values()), "groups": dict(gold_per_group), "items": items,
             "summary_items": 2.0, "worst_group": min(gold_per_group, key=gold_per_group.get)}
    return {"kl": kl, "seconds": 10.0, "test": split, "ood": split}


def test_interpolation_in_log_kl_along_a_sweep_by_hand():
    a, b = _measured(0.5, {g: 0.4 for g in toy.GROUPS}), _measured(2.0, {g: 0.8 for g in toy.GROUPS})
    items, groups = frontier.at_kl([(0.5, a), (2.0, b)], 1.0)  # log 1 lies halfway between log 0.5 and log 2
    assert np.allclose(items, 0.6) and groups == pytest.approx({g: 0.6 for g in toy.GROUPS})
    assert frontier.at_kl([(0.5, a), (2.0, b)], 3.0) is None  # no extrapolation


def test_a_sweep_with_tied_kls_sorts_and_a_measurement_twice_is_refused(tmp_path):
    measured = {("ppo_kl", c, 1): _measured(kl, {g: 0.5 for g in toy.GROUPS}) for c, kl in ((1.0, -0.02), (0.5, 0.0005), (0.1, 2.0))}
    assert [kl for kl, _ in frontier.sweep(measured, "ppo_kl", 1)] == [1e-3, 1e-3, 2.0]  # both below the floor: no dict comparison
    paths = []
    for folder in ("rloo@1", "rloo@1.0"):
        path = tmp_path / "pipeline-s1" / folder / "measured.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(measured["ppo_kl", 1.0, 1]))
        paths.append(str(path))
    with pytest.raises(SystemExit, match="a second measurement of rloo at 1 on seed 1"):
        frontier.load(paths)


def test_the_verdict_finds_the_method_above_ppo_at_matched_kl(tmp_path):
    """Three seeds; a method whose gold is 0.1 above PPO w/ KL's everywhere, and whose worst group
    (summary) is 0.2 above, at every KL: Win − Lose +100 [+100, +100], Δ worst +0.2; one whose
    sweep stops short of a level is reported as not reaching it."""
    paths = []
    for seed in (1, 2, 3):
        for method, coef, kl, shift, worst in (("ppo_kl", 0.5, 0.4, 0.0, 0.0), ("ppo_kl", 0.05, 2.5, 0.0, 0.0),
                                               ("rloo", 0.5, 0.3, 0.1, 0.2), ("rloo", 0.05, 3.0, 0.1, 0.2), ("par", 0.5, 0.45, 0.0, 0.0)):
            base = {"copy": 0.7, "lookup": 0.8, "harmful": 0.9, "summary": 0.3}
            gold = {g: v + shift + (worst - shift if g == "summary" else 0.0) for g, v in base.items()}
            path = tmp_path / f"pipeline-s{seed}" / "frontier" / "measured" / f"{method}@{coef}" / "measured.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(_measured(kl, gold)))
            paths.append(str(path))
    text = frontier.verdict(frontier.load(paths), [1.0])
    rloo = [line for line in text.splitlines() if "| RLOO |" in line][0].split(" | ")
    assert rloo[4].startswith("+100.0 [+100.0, +100.0]") and rloo[5].startswith("+0.200 [+0.200, +0.200]")
    assert "| PAR | (not reached on every seed)" in text
    report = frontier.report(frontier.load(paths), str(tmp_path / "report"))
    assert "| RLOO | 0.05 | 3 | 3.000 ± 0.000 |" in report and (tmp_path / "report" / "frontier.png").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_pipeline")  # one worker builds the pipeline and runs these (none waits)
def test_the_frontier_driver_on_a_tiny_budget(tiny_pipeline, tmp_path):
    out = str(tmp_path / "p")
    shutil.copytree(tiny_pipeline[0], out)
    proc = run_pipeline("study/frontier.sh", "--pipeline", out, "--etas", "0 0.5", "--dpo_betas", "0.1 0.3", "--members", "1",
                        "--methods", "ppo_kl uwo dpo", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    measured = frontier.load([os.path.join(out, "frontier", "measured", f"{m}@{c}", "measured.json")
                              for m in ("ppo_kl", "uwo", "dpo") for c in (("0.1", "0.3") if m == "dpo" else ("0", "0.5"))])
    assert len(measured) == 6 and all(math.isfinite(v["kl"]) and 0 <= v["test"]["gold"] <= 1 for v in measured.values())
    assert "reused" not in proc.stdout and os.path.isdir(os.path.join(out, "frontier", "rm_seed103"))  # the member: seed 3 + 100
    assert not os.path.exists(os.path.join(out, "frontier", "ppo_kl_0.5"))  # the pipeline's own ppo_kl (η 0.5) is reused
    assert not os.path.exists(os.path.join(out, "frontier", "ppo_kl_0"))  # and at η 0 its ppo (the same command, no KL)
    assert not os.path.exists(os.path.join(out, "frontier", "dpo_0.1"))
