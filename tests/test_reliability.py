"""A run that fails says so: resume that logs each step once, runs that train nothing exit non-zero,
checkpoints that cannot run code, flags and directories checked before any work. Each test here
failed on the code before it (tiny models, one thread)."""
import errno
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import data
import plumbing
import ppo_gi
import reward
import sft
from conftest import ROOT, read_metrics

SFT_SHORT = ["--steps", "12", "--batch_size", "16", "--log_every", "1", "--eval_every", "6", "--gold_prompts", "0", "--lr", "3e-3"]
PPO_SHORT = ["--reward", "gold", "--rollout_batch", "16", "--minibatch", "8", "--max_new_tokens", "8", "--eval_prompts", "8"]


def values(path):
    """metrics.jsonl without the wall-clock columns: what must not depend on an interruption."""
    return [{k: v for k, v in r.items() if k != "time_s" and not k.startswith("perf/")} for r in read_metrics(path)]


class Killed(BaseException):
    """Stands for kill -9: raised where the process would die, caught by the test; no code of the
    stage runs after it (nothing catches a BaseException), so the files are as a killed run leaves them."""


def killed(module, argv, monkeypatch, step=None):
    """Run a stage in this process, killed right after the metrics row of `step` is written, or (step
    None) at its first save_model: after its last checkpoint, before the model is saved."""
    with monkeypatch.context() as patch:
        if step is None:
            patch.setattr(plumbing, "save_model", lambda *a, **k: (_ for _ in ()).throw(Killed()))
        else:
            log = plumbing.MetricsLog.log

            def log_then_die(self, at, metrics):
                log(self, at, metrics)
                if at == step:
                    raise Killed()
            patch.setattr(plumbing.MetricsLog, "log", log_then_die)
        with pytest.raises(Killed):
            module.main(module.parser.parse_args(argv))


@pytest.mark.slow
def test_sft_killed_after_a_checkpoint_resumes_with_the_uninterrupted_log_row_for_row(tmp_path, monkeypatch):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    sft.main(sft.parser.parse_args(["--out", full, "--save_every", "4", *SFT_SHORT]))
    killed(sft, ["--out", part, "--save_every", "4", *SFT_SHORT], monkeypatch, step=7)  # checkpoint at 4, killed at 7
    assert len(read_metrics(os.path.join(part, "metrics.jsonl"))) > 4
    sft.main(sft.parser.parse_args(["--out", part, "--save_every", "4", *SFT_SHORT, "--resume"]))
    assert values(os.path.join(part, "metrics.jsonl")) == values(os.path.join(full, "metrics.jsonl"))


@pytest.mark.slow
def test_ppo_killed_after_a_checkpoint_resumes_with_the_uninterrupted_log_and_rollouts(toy_sft_dir, tmp_path, monkeypatch):
    full, part, late = (str(tmp_path / n) for n in ("full", "part", "late"))
    base = ["--sft", toy_sft_dir, "--steps", "6", "--save_every", "3", *PPO_SHORT]
    ppo_gi.main(ppo_gi.parser.parse_args(base + ["--out", full]))
    killed(ppo_gi, base + ["--out", part], monkeypatch, step=5)  # checkpoint at 3, killed at 5
    ppo_gi.main(ppo_gi.parser.parse_args(base + ["--out", part, "--resume"]))
    assert values(os.path.join(part, "metrics.jsonl")) == values(os.path.join(full, "metrics.jsonl"))
    # killed after the final checkpoint, before the model is saved: the resumed run finishes and keeps the rollouts
    killed(ppo_gi, base + ["--out", late], monkeypatch)
    ppo_gi.main(ppo_gi.parser.parse_args(base + ["--out", late, "--resume"]))
    rollouts = lambda out: open(os.path.join(out, "rollouts.jsonl")).read()  # noqa: E731
    assert rollouts(late) == rollouts(full) and rollouts(full).count("\n") == 16
    assert values(os.path.join(late, "metrics.jsonl")) == values(os.path.join(full, "metrics.jsonl"))
    assert os.path.exists(os.path.join(late, "config.json"))


def test_resume_without_a_checkpoint_or_with_other_flags_is_an_error(toy_sft_dir, tmp_path, capsys):
    out = str(tmp_path / "ppo")
    with pytest.raises(SystemExit):
        ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", out, "--steps", "2", *PPO_SHORT, "--resume"]))
    assert "no checkpoint" in capsys.readouterr().err
    ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", out, "--steps", "4", "--save_every", "1", "--stop_at", "1", *PPO_SHORT]))
    other_sft = str(tmp_path / "other_sft")  # another policy: the same files, other weights
    shutil.copytree(toy_sft_dir, other_sft, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl", ".lock"))
    w = os.path.join(other_sft, "model.safetensors")
    safetensors.torch.save_file({k: v + 1 for k, v in safetensors.torch.load_file(w).items()}, w)
    with pytest.raises(SystemExit):  # another policy, another shape: refused, both named
        ppo_gi.main(ppo_gi.parser.parse_args(["--sft", other_sft, "--out", out, "--steps", "4", *PPO_SHORT,
                                              "--max_new_tokens", "9", "--resume"]))
    err = capsys.readouterr().err
    assert "--max_new_tokens 9 (was 8)" in err and "--sft" in err
    # the number of iterations and the logging may change
    ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", out, "--steps", "2", "--save_every", "1", "--log_every", "2",
                                          *PPO_SHORT, "--resume"]))
    assert os.path.exists(os.path.join(out, "config.json"))


def test_a_checkpoint_cannot_run_code_on_resume(tmp_path):
    out = str(tmp_path / "sft")
    sft.main(sft.parser.parse_args(["--out", out, "--save_every", "2", "--stop_at", "2", *SFT_SHORT]))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    state = os.path.join(plumbing.find_checkpoint(out), "trainer_state.pt")
    with open(state, "wb") as f:
        pickle.dump({"optimizers": Payload(), "torch_rng": torch.get_rng_state()}, f)
    with pytest.raises(SystemExit, match="trainer_state.pt is truncated, corrupt or unsafe to load"):
        sft.main(sft.parser.parse_args(["--out", out, "--save_every", "2", *SFT_SHORT, "--resume"]))
    assert not marker.exists()


def test_runs_that_train_nothing_exit_non_zero_and_save_nothing(toy_sft_dir, tmp_path, capsys):
    out = str(tmp_path / "ppo")
    with pytest.raises(SystemExit, match="skipped as non-finite"):  # every update from the second on is NaN
        ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", out, "--steps", "3", *PPO_SHORT, "--lr", "1e3"]))
    assert "update skipped" in capsys.readouterr().out and not os.path.exists(os.path.join(out, "config.json"))
    # a reward model whose scores are NaN stops PPO before it trains on them
    rm = reward.load_reward_model(toy_sft_dir, plumbing.load_tokenizer(toy_sft_dir))
    with torch.no_grad():
        rm.hf.score.weight.fill_(float("nan"))
    nan_rm = str(tmp_path / "nan_rm")
    plumbing.save_model(rm, plumbing.load_tokenizer(toy_sft_dir), nan_rm, plumbing.Dist(), extra={"reward_stats.json": {"mean": 0.0, "std": 1.0}})
    with pytest.raises(SystemExit, match="not finite"):
        ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", str(tmp_path / "p2"), "--steps", "2", *PPO_SHORT,
                                              "--reward", nan_rm]))
    # the running std ignores a NaN score and says so
    running = ppo_gi.RunningStd()
    running.update(torch.tensor([0.0, float("nan"), 2.0]), plumbing.Dist())
    assert running.std == pytest.approx(2 ** 0.5) and "ignores 1 non-finite" in capsys.readouterr().out


def test_the_reward_model_must_read_the_policys_token_ids(toy_sft_dir, tmp_path):
    tok = plumbing.load_tokenizer(toy_sft_dir)
    rm = str(tmp_path / "rm")
    other = plumbing.load_tokenizer(toy_sft_dir)
    other.add_tokens(["<extra>"])
    plumbing.save_model(reward.load_reward_model(toy_sft_dir, tok), other, rm, plumbing.Dist(), extra={"reward_stats.json": {"mean": 0.0, "std": 1.0}})
    with pytest.raises(SystemExit, match="different tokenizers: vocabulary"):
        ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", str(tmp_path / "p"), "--steps", "1", *PPO_SHORT, "--reward", rm]))


def test_a_directory_of_the_wrong_kind_or_missing_is_named_at_once(toy_sft_dir, tmp_path, monkeypatch):
    rm = str(tmp_path / "rm")
    tok = plumbing.load_tokenizer(toy_sft_dir)
    plumbing.save_model(reward.load_reward_model(toy_sft_dir, tok), tok, rm, plumbing.Dist(), extra={"reward_stats.json": {"mean": 0.0, "std": 1.0}})
    with pytest.raises(SystemExit, match="--sft .*this is a reward model directory"):
        ppo_gi.main(ppo_gi.parser.parse_args(["--sft", rm, "--out", str(tmp_path / "p"), *PPO_SHORT]))
    with pytest.raises(SystemExit, match="--reward .*this is a causal LM"):
        ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", str(tmp_path / "p"), *PPO_SHORT, "--reward", toy_sft_dir]))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match="runs/sft_typo: no such directory"):  # not sent to the hub
        sft.main(sft.parser.parse_args(["--model", "runs/sft_typo", "--out", str(tmp_path / "s")]))


def test_an_output_directory_in_use_by_another_run_is_refused(toy_sft_dir, tmp_path):
    out = tmp_path / "ppo"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(other.pid))
        with pytest.raises(SystemExit, match=f"in use by another run \\(process {other.pid}.*the lock is stale .*: remove .*/.lock"):
            ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", str(out), "--steps", "1", *PPO_SHORT]))
    finally:
        other.kill()
        other.wait()
    ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", str(out), "--steps", "1", *PPO_SHORT]))  # a dead lock is taken over
    assert (out / ".lock").read_text() == str(os.getpid())  # (and removed when this process exits)


@pytest.mark.parametrize("module, flags", [
    (sft, ["--steps", "0"]), (sft, ["--batch_size", "0"]), (sft, ["--grad_accum", "0"]), (sft, ["--eval_every", "0"]),
    (sft, ["--log_every", "0"]), (sft, ["--lr", "-1e-3"]), (sft, ["--max_skipped", "1.5"]),
    (ppo_gi, ["--minibatch", "0"]), (ppo_gi, ["--rollout_batch", "0"]), (ppo_gi, ["--n_groups", "0"]), (ppo_gi, ["--max_new_tokens", "0"]),
    (ppo_gi, ["--temperature", "0"]), (ppo_gi, ["--lr", "-1"]), (ppo_gi, ["--steps", "0"]), (ppo_gi, ["--gamma", "1.5"])])
def test_every_count_size_and_rate_is_checked_by_the_parser(module, flags, capsys):
    with pytest.raises(SystemExit):
        module.parser.parse_args(flags)
    assert flags[0] in capsys.readouterr().err.split("error: argument ")[1].split(":")[0]


def test_one_group_is_not_gi_ppo(toy_sft_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", str(tmp_path / "p"), *PPO_SHORT, "--n_groups", "1"]))
    assert "--n_groups 1: GI-PPO needs at least 2 groups" in capsys.readouterr().err


def test_truncation_is_counted_and_identical_pairs_are_dropped(toy_sft_dir, capsys):
    tok = plumbing.load_tokenizer(toy_sft_dir)
    long = " " + " ".join(["apple"] * 40)
    pairs = [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " yes", "rejected": " no"},
             {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": long + " river", "rejected": long + " stone"}]
    examples, kept = plumbing.encode_pairs(tok, pairs, max_len=20, report="reward")
    assert kept == pairs[:1] and len(examples) == 1  # cut to 20 tokens, the second pair's two sides are the same
    out = capsys.readouterr().out
    assert "at --max_len 20, 50.0% of 2 pairs cut, 50.0% lost their EOS, 1 made identical (dropped): WARNING" in out


def test_max_len_must_hold_the_prompt_and_hub_ids_are_told_from_paths(toy_sft_dir, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", str(tmp_path / "p"), *PPO_SHORT, "--max_len", "8"]))
    assert "--max_len 8 must exceed --max_new_tokens 8" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plumbing.models, "hub_reachable", lambda: True)
    for hub_id in ("gpt2", "openai-community/gpt2"):  # not looked up here: only told apart from a path
        plumbing.check_model_dir(hub_id, "--model", "lm")
    for path in ("runs/sft", "./sft", "a/b/c"):
        with pytest.raises(SystemExit, match="no such directory"):
            plumbing.check_model_dir(path, "--sft", "lm")
    # with no network, a relative path under a missing folder (it looks like owner/name) is an error at once, not
    # a minute of hub retries and a raw OSError
    monkeypatch.setattr(plumbing.models, "hub_reachable", lambda: False)
    with pytest.raises(SystemExit, match="--sft myruns/sft: myruns/ does not exist here, and as a hub model id it is neither"):
        plumbing.check_model_dir("myruns/sft", "--sft", "lm")


# the variants pipeline.sh runs (the toy pipeline, --study, --data hh): each resumes to the uninterrupted run
RESUMED_VARIANTS = {"ppo": ["--no_gi", "--kl_coef", "0"], "ppo_kl": ["--no_gi"], "gi_ppo": [], "gi_fixed_kl": ["--fixed_kl"],
                    "gi_beta0": ["--beta_policy", "0"], "ppo_shuffled": ["--no_gi", "--shuffle_rewards"]}  # the study's: tests/study


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(RESUMED_VARIANTS))
def test_every_ppo_variant_resumes_to_the_uninterrupted_run(toy_sft_dir, tmp_path, variant):
    """(Before: --no_gi and --groups known crashed on resume, the group head having no optimizer state.)"""
    base = ["--sft", toy_sft_dir, "--steps", "4", "--save_every", "2", *PPO_SHORT, "--eval_prompts", "0", *RESUMED_VARIANTS[variant]]
    ppo_gi.main(ppo_gi.parser.parse_args(base + ["--out", str(tmp_path / "full")]))
    ppo_gi.main(ppo_gi.parser.parse_args(base + ["--out", str(tmp_path / "part"), "--stop_at", "2"]))
    ppo_gi.main(ppo_gi.parser.parse_args(base + ["--out", str(tmp_path / "part"), "--resume"]))
    assert values(tmp_path / "part" / "metrics.jsonl") == values(tmp_path / "full" / "metrics.jsonl")


def test_a_new_run_never_overwrites_an_earlier_run_or_an_input(toy_sft_dir, tmp_path, capsys):
    """A fresh run on an --out that holds checkpoints, a finished run or a log is refused (before: a
    shorter new run deleted its own checkpoint, and a later --resume continued the old run's), as is an
    --out that is an input (before: --sft D --out D replaced the reference of every other variant)."""
    out = str(tmp_path / "ppo")
    run = lambda *extra: ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, *PPO_SHORT, *extra]))  # noqa: E731
    run("--out", out, "--steps", "4", "--save_every", "2", "--stop_at", "2")
    with pytest.raises(SystemExit):
        run("--out", out, "--steps", "1", "--save_every", "1")
    assert "holds an earlier run (metrics.jsonl, checkpoints up to step 2): a new run does not overwrite it. --resume continues it" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --resume --steps before the checkpoint would save a mislabelled model
        run("--out", out, "--steps", "1", "--save_every", "2", "--resume")
    assert "--resume --steps 1: the checkpoint" in capsys.readouterr().err and not os.path.exists(os.path.join(out, "config.json"))
    run("--out", out, "--steps", "4", "--save_every", "2", "--resume")  # finished: config.json
    log = open(os.path.join(out, "metrics.jsonl")).read()
    with pytest.raises(SystemExit):  # a finished run and its log are kept whole
        run("--out", out, "--steps", "4", "--save_every", "0")
    assert "holds an earlier run (config.json, metrics.jsonl, checkpoints up to step 4)" in capsys.readouterr().err
    assert open(os.path.join(out, "metrics.jsonl")).read() == log
    rm = str(tmp_path / "rm")
    tok = plumbing.load_tokenizer(toy_sft_dir)
    plumbing.save_model(reward.load_reward_model(toy_sft_dir, tok), tok, rm, plumbing.Dist(), extra={"reward_stats.json": {"mean": 0.0, "std": 1.0}})
    for flag, path in (("--sft", toy_sft_dir), ("--reward", rm), ("--judge_reward", rm)):
        with pytest.raises(SystemExit):
            run("--out", path + "/", *([flag, path] if flag != "--sft" else []))
        assert f"is {flag} {path}, an input of this run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sft.main(sft.parser.parse_args(["--model", toy_sft_dir, "--out", toy_sft_dir, *SFT_SHORT]))
    assert "is --model" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_resumes_under_another_path_to_the_same_folder_and_its_inputs(toy_sft_dir, tmp_path, monkeypatch):
    """--resume compares what the run is, not how its paths are spelled: a trailing slash, a relative
    --out, or the run and its SFT model moved elsewhere (before: refused as changed flags)."""
    out = tmp_path / "ppo"
    base = ["--steps", "4", "--save_every", "2", *PPO_SHORT, "--eval_prompts", "0"]
    ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", str(out), "--stop_at", "2", *base]))
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(out), moved / "ppo")
    shutil.copytree(toy_sft_dir, moved / "sft")
    monkeypatch.chdir(moved)
    ppo_gi.main(ppo_gi.parser.parse_args(["--sft", "sft/", "--out", "ppo/", "--resume", *base]))
    assert os.path.exists(moved / "ppo" / "config.json")


def test_a_truncated_checkpoint_or_a_full_disk_is_an_error_that_says_what_to_do(toy_sft_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "sft")
    sft.main(sft.parser.parse_args(["--out", out, "--save_every", "2", "--stop_at", "2", *SFT_SHORT]))
    weights = os.path.join(plumbing.find_checkpoint(out), "model", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(SystemExit, match="model.safetensors is truncated, corrupt or unsafe to load .*Remove .*step-000002"):
        sft.main(sft.parser.parse_args(["--out", out, "--save_every", "2", *SFT_SHORT, "--resume"]))
    # the disk fills while a checkpoint is written: said so, the partial folder removed, nothing else left behind
    full = str(tmp_path / "full")

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(SystemExit, match="no space left on the device .*removed the partial .*step-000002.tmp"):
        sft.main(sft.parser.parse_args(["--out", full, "--save_every", "2", *SFT_SHORT]))
    assert os.listdir(os.path.join(full, "checkpoints")) == []


def test_saving_writes_nothing_beside_the_output_folder(toy_sft_dir, tmp_path):
    """(Before: --out X deleted a sibling X.saving that the run did not create.)"""
    mine = tmp_path / "sft.saving"
    mine.mkdir()
    (mine / "keep.txt").write_text("a user's file")
    sft.main(sft.parser.parse_args(["--out", str(tmp_path / "sft"), "--save_every", "0", *SFT_SHORT]))
    assert (mine / "keep.txt").read_text() == "a user's file"
    assert sorted(os.listdir(tmp_path)) == ["sft", "sft.saving"]


def test_bad_flags_and_inputs_are_errors_that_name_them(toy_sft_dir, tmp_path, capsys):
    """Each of these was a traceback: --minibatch above --rollout_batch (a division by zero), a critic
    (no reward_stats.json) as --reward (FileNotFoundError), groups.py's unchecked counts, a missing
    --rollouts file; bad data a stage reads (data.DataError) is one line, exit status 2."""
    with pytest.raises(SystemExit):
        ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", str(tmp_path / "p"), *PPO_SHORT, "--minibatch", "32"]))
    assert "--batch_size (--minibatch) 32 exceeds --rollout_batch 16" in capsys.readouterr().err
    critic = str(tmp_path / "critic")
    tok = plumbing.load_tokenizer(toy_sft_dir)
    plumbing.save_model(reward.load_reward_model(toy_sft_dir, tok), tok, critic, plumbing.Dist())
    with pytest.raises(SystemExit, match="--reward .*critic: no reward_stats.json"):
        ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--out", str(tmp_path / "p"), *PPO_SHORT, "--reward", critic]))
    from study import inspect_groups
    for flags in (["--n_groups", "1"], ["--fit_steps", "-1"], ["--min_group_frac", "-0.5"], ["--lr", "0"], ["--max_len", "0"]):
        with pytest.raises(SystemExit):
            inspect_groups.parser.parse_args(flags)
        assert flags[0] in capsys.readouterr().err
    with pytest.raises(data.DataError, match="--rollouts .*nope.jsonl: no such file"):  # (plumbing.run_main: one line, exit 2)
        inspect_groups.main(inspect_groups.parser.parse_args(["--rollouts", str(tmp_path / "nope.jsonl"), "--critic", critic]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": " r"}\n{not json\n')
    proc = subprocess.run([sys.executable, "sft.py", "--data", str(bad), "--split", "all", "--out", str(tmp_path / "s")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and f"{bad}, line 2" in proc.stderr


def test_a_group_named_mean_does_not_overwrite_the_overall_mean():
    out = plumbing.group_means("kl", [1.0, 3.0, 8.0], ["mean", "mean", "other"], ["mean", "other"], plumbing.Dist())
    assert out == {"kl/group/mean": 2.0, "kl/group/other": 8.0, "kl/mean": 4.0}  # (before: kl/mean was the group's 2.0)
