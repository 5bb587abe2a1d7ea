"""study/study.sh and study/sweep.sh on a tiny finished pipeline: every row of the study, each run the
pipeline's own command with only its row's flags changed, the evaluation and the report over seeds."""
import json
import os

import pytest

import evaluate
from conftest import run_pipeline
from study import reports


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_pipeline")  # one worker builds the pipeline and runs these (none waits)
def test_the_study_driver_on_a_tiny_budget(tiny_pipeline, tmp_path):
    import shutil
    out = str(tmp_path / "p")
    shutil.copytree(tiny_pipeline[0], out)  # the study writes into the pipeline's folder
    proc = run_pipeline("study/study.sh", "--pipeline", out, "--betas", "1", "--kl_match_tries", "1", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = os.path.join(out, "study", "eval", "results.json")
    names = [evaluate.parse_named(o)[0] for o in json.loads(open(results).read())["settings"]["opponents"]]
    assert names == [f"GI ({g}) β 1" for g in ("x,y", "x", "known")] + ["PPO w/ KL", "PPO (rank KL)", "DPO", "GR-DPO", "SFT"]
    # each run is the pipeline's gi_ppo with its row's flags given last (they win), the known groups' M from the data
    known = json.loads(open(os.path.join(out, "study", "gi_known_beta1", "ppo_args.json")).read())
    gi = json.loads(open(os.path.join(out, "gi_ppo", "ppo_args.json")).read())
    assert known["groups"] == "known" and known["n_groups"] == 4 and known["beta_policy"] == 1
    assert set(known) - set(gi) == {"groups", "group_input", "kl_weight", "estimator", "rloo_k", "ensemble", "members", "uwo_lambda", "par"}
    assert (known["estimator"], known["ensemble"], known["par"]) == ("gae", "none", False)  # study/ppo_variants.py's own flags
    assert (known["sft"], known["reward"]) == (os.path.join(out, "sft"), os.path.join(out, "reward"))  # the copy's, not the original's
    same = [k for k in gi if k not in ("n_groups", "beta_policy", "out", "sft", "reward")]
    assert {k: known[k] for k in same} == {k: gi[k] for k in same}
    table = reports.study_table([results, results], str(tmp_path / "agg"))
    assert len(table.splitlines()) == 4 + 9 and (tmp_path / "agg" / "study.png").exists()
    assert "| PPO w/ KL (KL-matched) | " in table and "+0.0 [+0.0, +0.0]" in table.splitlines()[4]  # itself: all ties
    versus_sft = reports.study_table([results], str(tmp_path / "agg2"), versus="SFT")
    assert [line for line in versus_sft.splitlines() if line.startswith("| SFT |")][0].count("+0.0 [+0.0, +0.0]") == 2
    sweep = run_pipeline("study/sweep.sh", "--pipeline", out, "--etas", "0.5", "--betas", "1", "--no_reference", timeout=600)
    assert sweep.returncode == 0 and len(open(os.path.join(out, "sweep", "sweep.md")).read().splitlines()) == 2 + 2, sweep.stderr[-2000:]
