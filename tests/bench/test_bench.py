"""Every script in bench/ runs as a user would run it (`python bench/X.py`), on a tiny budget, and
prints its JSON lines: a stage change that breaks a benchmark (a flag renamed, a new check on an
input, a metric's name) fails here instead of at the next benchmark round. bench/gpu_check.py
--tiny is run by tests/test_bf16_perf.py; bench/trl_peers.py needs TRL, which is no dependency of
this project, and is skipped without it."""
import importlib.util
import json
import os

import pytest

import plumbing
from conftest import ROOT, run_script

pytestmark = pytest.mark.slow  # each runs a bench script as a user would: a process and a model each


def json_lines(stdout):
    """The JSON objects a script printed, one a line (other lines, such as a stage's own log, skipped)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def check_ppo_step(lines):
    assert [r["variant"] for r in lines] == ["ppo", "gi_ppo"]
    for r in lines:
        assert r["timed_steps"] == 1 and r["peak_rss_mb"] > 0
        for phase in ("gen_median_s", "score_median_s", "train_median_s"):  # one step: its phases lie within it
            assert 0 < r[phase] <= r["step_median_s"] + 1e-3, (phase, r)


def check_preference(lines):
    assert [r["trainer"] for r in lines] == ["dpo", "reward"]
    assert all(r["pairs_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in lines)
    assert lines[0]["ref_precompute_s"] >= 0 and "ref_precompute_s" not in lines[1]  # only DPO precomputes π_ref


def check_generate(lines):
    hf, loop, ratios, draws = lines
    assert (hf["impl"], loop["impl"]) == ("hf", "loop")
    assert all(r["calls"] == 1 and r["median_s"] > 0 and r["tokens_per_s"] > 0 for r in (hf, loop))
    assert ratios["same_tokens"] is True and ratios["speedup_loop_over_hf"] > 0  # a seed gives both the same tokens
    assert draws["draw_shape"] == [2, 4096] and draws["draw_same_numbers"] is True
    assert all(ms > 0 for ms in draws["draw_ms"].values())


def check_op_profile(lines):
    assert [r["profile"] for r in lines] == ["rollout of iteration 1 (generation and scoring)", "PPO update of iteration 1"]
    for r in lines:
        assert r["time"] == "self CPU" and r["product_gflop"] > 0 and 0 < r["product_ms"] < r["total_ms"]
        assert any(name in ("aten::mm", "aten::addmm") for name, _ in r["top_ms"])


def check_other_arithmetic(lines):
    assert [(r["work"], r["variant"], r["round"]) for r in lines] == [("gi_ppo", v, 0) for v in ("as_is", "fused_adamw", "erf_gelu")]
    assert lines[0]["speedup_over_as_is"] == 1.0 and all(r["speedup_over_as_is"] > 0 and r["timed_steps"] == 1 for r in lines)


def check_trl_peers(lines):
    for r in lines:
        if r.get("trainer"):
            assert r["trainer"] in ("trl_dpo", "trl_reward") and r["pairs_per_s"] > 0
        else:
            assert r["variant"] == "trl_ppo" and r["timed_steps"] == 1 and 0 < r["gen_median_s"] <= r["step_median_s"]


def trl_kinds():
    """TRL 1.x has DPOTrainer and RewardTrainer; 0.29.1 PPOTrainer too (under trl.experimental)."""
    try:
        has_ppo = importlib.util.find_spec("trl.experimental.ppo") is not None
    except ImportError:
        has_ppo = False
    return ["dpo", "reward"] + (["ppo"] if has_ppo else [])


SCRIPTS = {  # id: (script and its tiny flags, check of its JSON lines)
    "ppo_step": (["bench/ppo_step.py", "--warmup", "0", "--timed", "1"], check_ppo_step),
    "preference": (["bench/preference.py", "--steps", "1"], check_preference),
    "generate": (["bench/generate.py", "--calls", "1", "--batch", "2", "--new_tokens", "4"], check_generate),
    "op_profile": (["bench/op_profile.py", "ppo", "--steps", "1", "--rows", "3"], check_op_profile),  # reward, dpo: preference's flags
    "other_arithmetic": (["bench/other_arithmetic.py", "--rounds", "1", "--work", "gi_ppo", "--warmup", "0", "--timed", "1"],
                         check_other_arithmetic),
    "trl_peers": (["bench/trl_peers.py", "--steps", "1", "--warmup", "0", "--timed", "1"], check_trl_peers),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_bench_script_runs_on_a_tiny_budget_and_prints_its_json_lines(name):
    """The script exits 0 and prints the JSON lines its docstring promises, with sane fields (times
    and rates > 0, a phase within its step, the variants and trainers in their order)."""
    args, check = SCRIPTS[name]
    if name == "trl_peers":
        pytest.importorskip("trl", reason="bench/trl_peers.py needs TRL (its own virtual environment; setup in its docstring)")
        args = args[:1] + trl_kinds() + args[1:]
    proc = run_script(args, timeout=300)
    lines = json_lines(proc.stdout)
    assert lines, f"{name} printed no JSON line:\n{proc.stdout[-2000:]}"
    if name != "op_profile":  # it prints tables too; the others only JSON lines
        assert len(lines) == len(proc.stdout.strip().splitlines()), proc.stdout[-2000:]
    check(lines)


def test_the_workload_has_a_reward_model_directory_of_the_same_gpt2(tmp_path, monkeypatch):
    """bench/workload.py's reward-model directory is one ppo_gi.py takes as --reward (a
    *ForSequenceClassification with reward_stats.json), with the policy's tokenizer and backbone:
    the same size and weights, a score head of one output in place of the LM head."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    from safetensors.torch import load_file
    from workload import build_workload, ppo_flags
    build_workload(str(tmp_path))
    flags = ppo_flags(str(tmp_path), str(tmp_path / "out"), steps=1)
    lm, rm = flags[flags.index("--sft") + 1], flags[flags.index("--reward") + 1]
    plumbing.check_model_dir(lm, "--sft", "lm")
    plumbing.check_reward_dir(rm, "--reward")
    with pytest.raises(SystemExit, match="this is a causal LM"):  # the workload's old --reward, refused
        plumbing.check_reward_dir(lm, "--reward")
    plumbing.check_same_tokenizer({"--sft": plumbing.load_tokenizer(lm), "--reward": plumbing.load_tokenizer(rm)})
    with open(os.path.join(rm, "reward_stats.json")) as f:
        assert json.load(f) == {"mean": 0.0, "std": 1.0}
    lm_w, rm_w = load_file(os.path.join(lm, "model.safetensors")), load_file(os.path.join(rm, "model.safetensors"))
    backbone = {k for k in lm_w if k.startswith("transformer.")}
    assert backbone and backbone == {k for k in rm_w if k.startswith("transformer.")}
    assert all(lm_w[k].equal(rm_w[k]) for k in backbone)
    assert rm_w["score.weight"].shape == (1, 128)


def test_the_lr_probe_fits_a_power_law_through_the_kls_by_hand(monkeypatch):
    """bench/ppo_lr_probe.py's fit: KL_k = 0.01·k² through k = 1, 2 gives exponent 2 and
    KL(60) = 0.01·3600 = 36; KL_k = 0.02·k (exponent 1) gives 1.2; one point is taken as ∝ k²."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    from ppo_lr_probe import bounds, fit
    assert fit([0.01, 0.04], 60) == pytest.approx((2.0, 36.0))
    assert fit([0.02, 0.04, 0.06], 60) == pytest.approx((1.0, 1.2))
    assert fit([0.003], 60) == (2.0, 0.003 * 3600)
    assert bounds([0.004, 0.003], 60) == pytest.approx((0.0035, 60 * (0.004 + 0.0015) / 2))  # flat: the mean; linear: KL_k / k
