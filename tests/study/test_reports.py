"""study/reports.py: the KL-matched search, the aggregate over seeds, the over-optimization curve and
table of PPO runs, the plots, on synthetic runs whose numbers are known."""
import importlib.util
import json
import math
import os

import pytest

from study import reports


def test_plots_are_written(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed (pip install -r requirements.txt)")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    rows = [{"model": m, "split": "test", "group": g, "gold_mean": x} for m in "AB" for g, x in (("copy", 0.5), ("sum", 0.2))]
    reports.plot(str(tmp_path), {"A": str(run)}, rows, {("A", "test"): [0.1, 0.5, 0.9]})
    for png in ("reward_distribution.png", "gold_per_group.png", "training_curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_kl_matched_search_interpolates_eta_in_log_log(tmp_path):
    def run(name, eta, kl):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ppo_args.json").write_text(json.dumps({"kl_coef": eta}))
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps({"objective/kl": kl}) + "\n" for _ in range(12)))
        (tmp_path / name / "config.json").write_text("{}")  # finished
        return str(tmp_path / name)
    target, first = run("gi", 0.5, 0.5), run("a", 0.5, 0.3)
    assert reports.match_kl(target, [first]) == f"next 0.3 {first}"  # one candidate: KL ∝ 1/η, 0.5·0.3/0.5
    # bracketing candidates: log η interpolated at log KL = log 0.5 between (0.2, 0.8) and (0.5, 0.3)
    slope = (math.log(0.8) - math.log(0.3)) / (math.log(0.2) - math.log(0.5))
    verdict, eta, closest = reports.match_kl(target, [first, run("b", 0.2, 0.8)]).split()
    assert verdict == "next" and float(eta) == pytest.approx(0.2 * math.exp((math.log(0.5) - math.log(0.8)) / slope), rel=2e-3)
    assert reports.match_kl(target, [first, run("c", 0.31, 0.46)]) == f"match {tmp_path / 'c'}"  # within 10%
    # a run that has not finished (no config.json: failed, or still running) is named, not read as KL 1e-6
    os.remove(tmp_path / "c" / "config.json")
    with pytest.raises(SystemExit, match=r"match_kl: .*/c is not a finished ppo_gi.py run \(no config.json; it may still be running"):
        reports.match_kl(target, [first, str(tmp_path / "c")])
    with pytest.raises(SystemExit, match=r"runs: .*/nothing is not a finished ppo_gi.py run \(no ppo_args.json, config.json, metrics.jsonl\)"):
        reports.run_table([str(tmp_path / "nothing")])


def test_aggregate_mean_and_std_over_runs(tmp_path):
    paths = []
    for k, (win, gold) in enumerate([(40.0, (0.2, 0.8)), (60.0, (0.4, 1.0))]):
        w = {"judge": "gold", "model": "M", "opponent": "O", "split": "test", "win": win, "tie": 100 - win - 10, "lose": 10.0, "invalid": 0.0}
        r = {"winrates": [w], "winrates_by_group": [{**w, "group": "g1", "n": 5, "win": win / 2, "tie": 90 - win / 2}],
             "groups": [{"model": "M", "split": "test", "group": "g1", "gold_mean": gold[0]},
                        {"model": "M", "split": "test", "group": "g2", "gold_mean": gold[1]}]}
        paths.append(str(tmp_path / f"r{k}.json"))
        with open(paths[-1], "w") as f:
            json.dump(r, f)
    text = reports.aggregate(paths)
    assert "| gold | O | 50.0 ± 10.0 / 40.0 ± 10.0 / 10.0 ± 0.0 |" in text  # np.std: population std
    assert "| gold | O | g1 | 25.0 ± 5.0 / 65.0 ± 5.0 / 10.0 ± 0.0 (n 5) |" in text
    assert "| M | test | 0.300 | 0.900 | 0.600 ± 0.100 | 0.600 ± 0.000 |" in text


def _ppo_run(path, judge, slope, n=7, no_gi=False):
    """A synthetic ppo_gi.py run: ppo_args.json and a metrics.jsonl whose judge (`gold` or `judge`)
    score moves by `slope` per iteration while the proxy RM's score (objective/scores) rises."""
    path.mkdir()
    (path / "ppo_args.json").write_text(json.dumps({"no_gi": no_gi, "beta_policy": 0.1, "lr": 1e-5, "kl_coef": 0.05, "rollout_batch": 64}))
    groups = ("copy", "summary") if judge == "gold" else ("harmless", "helpful")
    rows = [{"step": 0, "train/loss": 1.0}] + [
        {"step": i, "objective/kl": 0.1 * i, "objective/scores": 1.0 + 0.5 * i, f"{judge}/mean": 0.5 + slope * i,
         f"{judge}/group/{groups[0]}": 0.6, f"{judge}/group/{groups[1]}": 0.4 - 0.01 * i, "groups/size_0": 20.0 + i, "groups/size_1": 44.0 - i,
         f"kl/group/{groups[0]}": 0.2 * i, f"kl/group/{groups[1]}": 0.05, "kl/mean": 0.1 * i}
        for i in range(1, n + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.json").write_text("{}")  # a finished run
    return str(path)


def test_gold_vs_kl_curve_is_computed_and_plotted(tmp_path):
    """The over-optimization plot from each PPO run's metrics.jsonl: running means of KL, of the
    judge's score (gold on the built-in task, judge/* from the judge RM on real data) and of the proxy's."""
    runs = {"PPO": _ppo_run(tmp_path / "PPO", "gold", 0.1), "GI-PPO": _ppo_run(tmp_path / "GI-PPO", "gold", -0.1),
            "SFT": str(tmp_path / "sft_without_metrics")}
    curve = reports.gold_vs_kl(runs["PPO"], window=2)
    assert curve["judge"] == "gold" and set(curve["scores"]) == {"mean", "copy", "summary"} and len(curve["kl"]) == 7
    assert curve["kl"][:2] == pytest.approx([0.1, 0.15]) and curve["scores"]["mean"][-1] == pytest.approx(0.5 + 0.1 * 6.5)
    assert curve["proxy"][-1] == pytest.approx(1.0 + 0.5 * 6.5)
    assert reports.gold_vs_kl(runs["SFT"]) == {}
    # a real-data run that logged the judge RM (ppo_gi.py --judge_reward) instead of gold: the same curve
    judged = reports.gold_vs_kl(_ppo_run(tmp_path / "real", "judge", -0.05), window=2)
    assert judged["judge"] == "judge" and set(judged["scores"]) == {"mean", "harmless", "helpful"}
    assert judged["scores"]["mean"][-1] == pytest.approx(0.5 - 0.05 * 6.5) and judged["proxy"][-1] == pytest.approx(4.25)
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed: no plots")
    for name, dirs in (("toy", runs), ("real", {"PPO": str(tmp_path / "real")})):
        reports.plot_gold_vs_kl(str(tmp_path / name), dirs)
        assert (tmp_path / name / "gold_vs_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gold_vs_kl_keeps_a_group_the_last_iterations_missed(tmp_path):
    """A group absent from some iterations' logs (an HH batch of 8 can miss one) stays in the curve,
    averaged over the iterations in the window that sampled it; never sampled in a window: nan."""
    rows = [{"objective/kl": 0.1 * i, "judge/mean": 0.5, **({"judge/group/harmless": float(i)} if i in (1, 2, 4) else {})}
            for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    harmless = reports.gold_vs_kl(str(tmp_path), window=2)["scores"]["harmless"]
    assert harmless == pytest.approx([1.0, 1.5, 2.0, 4.0, 4.0])
    rows[3].pop("judge/group/harmless")  # now iterations 4 and 5 both missed it: nan at 5, the key still there
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert math.isnan(reports.gold_vs_kl(str(tmp_path), window=2)["scores"]["harmless"][4])


def test_run_table_reports_the_judge_and_the_proxy(tmp_path):
    toy = _ppo_run(tmp_path / "toy", "gold", 0.1)
    real, plain = _ppo_run(tmp_path / "real", "judge", -0.05), _ppo_run(tmp_path / "plain", "judge", 0.0, no_gi=True)
    table = reports.run_table([toy], last=2).splitlines()
    assert table[0].startswith("| run | β_policy | η | RL gold, first 2 | RL gold, last 2 | worst group (gold) | proxy RM score |")
    assert table[2].split(" | ")[1:9] == ["0.1", "0.05", "0.650", "1.150", "summary 0.335", "4.25", "0.65", "0.7"]
    table = reports.run_table([real, plain], last=2).splitlines()
    assert "| RL judge RM, first 2 | RL judge RM, last 2 | worst group (judge RM) |" in table[0] and len(table) == 4
    # last 2 iterations (6, 7): judge 0.5 − 0.05·6.5, helpful 0.4 − 0.01·6.5; the first 2 (1, 2): 0.5 − 0.05·1.5
    assert table[2].split(" | ")[3:7] == ["0.425", "0.175", "helpful 0.335", "4.25"]
    assert table[3].split(" | ")[1] == "0" and table[3].split(" | ")[10] == ""  # PPO: no GI, no inferred groups
    # the KL on each true group over the last 2 iterations (6, 7): 0.2·6.5 and 0.05; kl/mean is not a group
    assert table[2].split(" | ")[9] == "harmless 1.30, helpful 0.05"
    # a run that logged no judge at all: empty judge cells, the proxy still there
    bare = tmp_path / "bare"
    _ppo_run(bare, "gold", 0.0)
    (bare / "metrics.jsonl").write_text("".join(json.dumps({"objective/kl": 0.1, "objective/scores": 2.0, "groups/size_0": 32.0}) + "\n"
                                                for _ in range(3)))
    assert reports.run_table([str(bare)]).splitlines()[2].split(" | ")[3:7] == ["", "", "", "2.00"]


def test_run_table_averages_a_group_over_the_iterations_that_sampled_it(tmp_path):
    """An HH batch of 8 rollouts can miss a group: its mean is over the rows that logged it (here
    harmless 0.2 and 0.4 → 0.300), not a KeyError on the rows that did not."""
    run = tmp_path / "run"
    _ppo_run(run, "judge", 0.0)
    rows = [{"objective/kl": 0.1, "objective/scores": 1.0, "judge/mean": 0.5, "judge/group/helpful": 0.5, "groups/size_0": 3.0},
            {"objective/kl": 0.1, "objective/scores": 1.0, "judge/mean": 0.5, "judge/group/helpful": 0.7, "judge/group/harmless": 0.2,
             "kl/group/harmless": 0.3, "groups/size_0": 4.0},
            {"objective/kl": 0.1, "objective/scores": 1.0, "judge/mean": 0.5, "judge/group/helpful": 0.6, "judge/group/harmless": 0.4,
             "kl/group/harmless": 0.1, "groups/size_0": 5.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cells = reports.run_table([str(run)], last=3).splitlines()[2].split(" | ")
    assert cells[5] == "harmless 0.300" and cells[9] == "harmless 0.20" and cells[10] == "4.0 of 64"
