"""bench/'s tools: gpu_check.py --tiny prints a row per stage and skips what it cannot run,
op_profile.py's summary against a closed form, the shared workload, other_arithmetic.py's swaps."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import plumbing
from conftest import ROOT, run_script

pytestmark = pytest.mark.slow  # each runs a bench script as a user would: a process and a model each


def test_gpu_check_tiny_prints_a_row_per_stage(tmp_path):
    stages = ["sft", "rm", "gi_ppo", "generate", "sft_profile"]
    proc = run_script(["bench/gpu_check.py", "--tiny", "--assets", str(tmp_path / "none"), "--sizes", "135m",
                       "--stages", *stages, "--work", str(tmp_path)])
    rows = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is JSON
    by_stage = {}
    for r in rows[1:-1]:
        by_stage.setdefault(r["stage"], []).append(r)
    assert rows[0]["device"] == "cpu" and "total_s" in rows[-1] and sorted(by_stage) == sorted(stages)
    for stage in ("sft", "rm", "gi_ppo"):
        (r,) = by_stage[stage]
        assert "error" not in r, r
        assert {"stage", "params_m", "tokens_per_s", "mfu", "gpu_mem_gb", "step_s"} <= r.keys()
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["mfu"] is None  # MFU only on CUDA
    assert by_stage["gi_ppo"][0]["gen_tokens_per_s"] > 0
    assert [(r["impl"], r["cache"]) for r in by_stage["generate"]] == [("hf", "dynamic")] + [("loop", k) for k in plumbing.CACHE_KINDS]
    assert all(r["tokens_per_s"] > 0 for r in by_stage["generate"])
    (p,) = by_stage["sft_profile"]  # bench/op_profile.py's summary of SFT's loop: products within the total
    assert "error" not in p, p
    assert p["time"] == ("self GPU" if torch.cuda.is_available() else "self CPU")
    assert p["product_gflop"] > 0 and 0 < p["product_ms"] < p["total_ms"]
    assert any(k == "aten::mm" for k, _ in p["top_ms"])
    assert not any(n.startswith("gpu_check_") for n in os.listdir(tmp_path))  # the scratch folder is removed


def test_op_profile_sums_the_flops_of_a_known_product(capsys, monkeypatch):
    """bench/op_profile.py's summary against the closed form 2·m·k·n of one product."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import op_profile
    a, b = torch.randn(1024, 1024), torch.randn(1024, 512)
    op_profile.profiled(lambda: (a @ b).relu().sum(), "known", rows=3)()
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["product_gflop"] == round(2 * 1024 * 1024 * 512 / 1e9, 2)
    assert 0 < summary["product_ms"] < summary["total_ms"]  # relu and sum are the rest


def test_gpu_check_skips_a_stage_whose_input_did_not_run_and_names_missing_assets(tmp_path):
    proc = run_script(["bench/gpu_check.py", "--tiny", "--sizes", "1b", "--stages", "rm", "--work", str(tmp_path),
                       "--assets", str(tmp_path / "none")])
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows[1] == {"stage": "rm", "size": "1b", "skipped": "needs sft of 1b, which did not run"}
    bad = subprocess.run([sys.executable, "bench/gpu_check.py", "--assets", str(tmp_path / "none")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--prepare" in bad.stderr


def test_bench_workload_is_the_same_files_in_every_process(tmp_path):
    """bench/workload.py is built afresh by each benchmark process, ours and TRL's: under two hash
    seeds (which reorder Python's sets) it must write the same pairs, tokenizer and weights."""
    code = "import sys; sys.path.insert(0, 'bench'); from workload import build_workload; build_workload(sys.argv[1])"
    builds = {seed: subprocess.Popen([sys.executable, "-c", code, str(tmp_path / seed)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")}
    assert all(p.wait() == 0 for p in builds.values())  # the two builds run side by side
    digests = [[hashlib.sha256((tmp_path / seed / name).read_bytes()).hexdigest()
                for name in ("pairs.jsonl", "model/tokenizer.json", "model/model.safetensors")] for seed in builds]
    assert digests[0] == digests[1]


def test_other_arithmetic_swaps_in_fused_adamw_and_erf_gelu_only_when_asked(monkeypatch):
    """bench/other_arithmetic.py's variants: as_is leaves AdamW's foreach form and the tanh GELU;
    fused_adamw gives torch's fused AdamW only; erf_gelu that and GELU's erf form (which differs
    from the tanh form)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import other_arithmetic
    from transformers import GPT2Config, GPT2LMHeadModel

    def built():
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
        plumbing.fused_gelu(model)
        group = plumbing.optimizer(model, 1e-3).param_groups[0]
        return model.transformer.h[0].mlp.act, group["foreach"], group["fused"]

    x = torch.linspace(-4, 4, 101)
    tanh_form, exact = torch.nn.functional.gelu(x, approximate="tanh"), torch.nn.functional.gelu(x)
    assert not torch.equal(tanh_form, exact)
    other_arithmetic.apply("as_is", monkeypatch.setattr)
    act, foreach, fused = built()
    assert torch.equal(act(x), tanh_form) and foreach and not fused
    other_arithmetic.apply("fused_adamw", monkeypatch.setattr)
    act, foreach, fused = built()
    assert torch.equal(act(x), tanh_form) and not foreach and fused
    monkeypatch.undo()
    other_arithmetic.apply("erf_gelu", monkeypatch.setattr)
    act, foreach, fused = built()
    assert torch.equal(act(x), exact) and not foreach and fused
    with pytest.raises(SystemExit, match="unknown variant 'fast'"):
        other_arithmetic.apply("fast", monkeypatch.setattr)
