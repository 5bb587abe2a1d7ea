"""pipeline.sh: every stage reached (a dry run with echo for Python), the built-in task end to end on
a tiny budget, a rerun that skips exactly the stages made by the same command, and one that stops
when a stage's output was made by another."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT, TINY_PIPELINE, run_pipeline


def test_pipeline_sh_runs_its_stages_with_or_without_out_and_shared(tmp_path):
    """A dry run (--python echo prints each stage's command): the default --out, and --data hh from a
    clone with no ../shared (the hub id, no out-of-domain file) both reach their last stage."""
    shutil.copy(os.path.join(ROOT, "pipeline.sh"), tmp_path / "pipeline.sh")
    shutil.copytree(os.path.join(ROOT, "plumbing"), tmp_path / "plumbing")
    for argv, last in ((["--no_install"], "evaluate.py --model GI-PPO=runs/pipeline-s1/gi_ppo"),
                       (["--no_install", "--data", "hh"], "evaluate.py --data Anthropic/hh-rlhf")):
        proc = subprocess.run(["bash", "pipeline.sh", "--python", "echo", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and last in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--ood_data" not in proc.stdout  # no PKU-SafeRLHF file beside this copy
    assert "gi_known" in proc.stdout and "study/ppo_variants.py" in proc.stdout  # the known groups' run: a study variant
    help_text = subprocess.run(["bash", "pipeline.sh", "--help"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert "--ppo_lr VALUE" in help_text and "--hh_max_len VALUE" in help_text  # every knob is a flag with its help


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_pipeline")  # one worker builds the pipeline and runs these (none waits)
def test_pipeline_end_to_end_with_a_tiny_budget(tiny_pipeline, tmp_path):
    out, stdout = tiny_pipeline
    results = json.loads(open(os.path.join(out, "eval", "results.json")).read())
    opponents = {w["opponent"] for w in results["winrates"]}
    assert opponents == {"SFT", "PPO", "PPO w/ KL", "DPO", "GI-PPO fixed KL", "GI-PPO β_policy 0", "PPO (gold reward)", "PPO (shuffled)"}
    assert {w["judge"] for w in results["winrates"]} == {"gold", "rm"} and {w["split"] for w in results["winrates"]} == {"test", "ood"}
    assert all(abs(w["win"] + w["tie"] + w["lose"] + w["invalid"] - 100) < 1e-6 for w in results["winrates"])
    assert "Win / Tie / Lose" in stdout
    # a rerun skips every stage, made by the same command; another budget stops at the first stage it changes
    copy = str(tmp_path / "p")
    shutil.copytree(out, copy)
    again = run_pipeline("pipeline.sh", *TINY_PIPELINE, "--out", copy, timeout=300)
    assert again.returncode == 0 and again.stdout.count("made by this command: skipped") == 11, again.stdout[-2000:]
    other = run_pipeline("pipeline.sh", *TINY_PIPELINE, "--out", copy, "--rm_steps", "4", timeout=300)
    assert other.returncode == 1 and "reward: " in other.stderr and "made with:" in other.stderr and "this run: " in other.stderr
    assert not os.path.exists(os.path.join(copy, "replaced"))  # nothing moved or rerun without --force


def test_a_stage_record_names_the_pipeline_folder_and_still_reads_literal_paths(tmp_path):
    """stage records {pipeline} for STAGE_ROOT (a copied folder still matches), and a record written
    with literal paths (before the placeholder) is still "made by this command"; another command stops."""
    script = f"""source {ROOT}/plumbing/stages.sh
cd {tmp_path} && mkdir -p old/sft && touch old/sft/config.json
printf '%s\\n' sft.py --out old/sft > old/sft/pipeline_args.txt
STAGE_ROOT=a stage sft a/sft/config.json true sft.py --out a/sft > /dev/null; cat a/sft/pipeline_args.txt | tr '\\n' ' '; echo
STAGE_ROOT=old stage sft old/sft/config.json false sft.py --out old/sft
STAGE_ROOT=old stage sft old/sft/config.json false sft.py --out old/sft --steps 2"""
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert lines[0] == "sft.py --out {pipeline}/sft " and "made by this command: skipped" in lines[1], proc.stdout + proc.stderr
    assert proc.returncode == 1 and "this run:  --steps 2" in proc.stderr


def test_stage_args_reads_the_placeholder_as_the_callers_stage_root(tmp_path):
    """A stage below the pipeline's folder (study/NAME) reads {pipeline} as STAGE_ROOT, not as its
    parent folder; an explicit ROOT wins; a trailing slash is ignored."""
    script = f"""source {ROOT}/plumbing/stages.sh
cd {tmp_path} && mkdir -p p/study/x && printf '%s\\n' x.py --out '{{pipeline}}/study/x' > p/study/x/pipeline_args.txt
STAGE_ROOT=p stage_args p/study/x | tr '\\n' ' '; echo
STAGE_ROOT=p stage_args p/study/x q | tr '\\n' ' '; echo
STAGE_ROOT=p/ stage_args p/study/x | tr '\\n' ' '; echo"""
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines() == ["x.py --out p/study/x ", "x.py --out q/study/x ", "x.py --out p/study/x "], proc.stdout + proc.stderr
