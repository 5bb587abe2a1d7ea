"""bf16 autocast (the CUDA default, exercised here on CPU), the perf/* metrics, generate()'s KV cache
kinds, and bench/gpu_check.py --tiny."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import plumbing
import ppo_gi
import sft
from conftest import ROOT, read_metrics, run_script

TINY_RUN = ["--batch_size", "16", "--gold_prompts", "0", "--log_every", "1", "--eval_every", "1000", "--warmup", "3"]


@pytest.fixture(scope="module")
def tok_and_demos():
    demos = data.load_demos("toy", "train[:400]")
    return plumbing.train_tiny_tokenizer([x["prompt"] + x["response"] for x in demos]), demos


def test_bf16_autocast_computes_in_bf16_keeps_fp32_weights_and_fp32_logprobs(tok_and_demos):
    tok, demos = tok_and_demos
    model = plumbing.build_tiny_model(tok, seed=0)
    examples = sft.tokenize_demos(tok, demos[:4], 128)
    ids, mask, lm = sft.make_batch(examples, tok.pad_token_id)
    fp32_logp = sft.sequence_logprobs(model, ids, mask, lm)[0]
    plumbing.shard(model, plumbing.Dist(), bf16=True)
    plumbing.shard(model, plumbing.Dist(), bf16=True)  # idempotent: wrapped once
    assert model(input_ids=ids, attention_mask=mask).logits.dtype == torch.bfloat16
    logp = sft.sequence_logprobs(model, ids, mask, lm)[0]
    assert logp.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(logp, fp32_logp) and torch.allclose(logp, fp32_logp, rtol=0.05)
    n_resp = ids.shape[1] - 10
    ppo_logp, _ = plumbing.response_logprobs(model, ids, mask, 10, 1.0)
    assert ppo_logp.dtype == torch.float32 and ppo_logp.shape == (4, n_resp)
    (-logp.sum()).backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("bf16", [False, True])
def test_generate_cache_kinds_give_the_same_greedy_tokens(tok_and_demos, bf16):
    tok, demos = tok_and_demos
    model = plumbing.shard(plumbing.build_tiny_model(tok, seed=0).eval(), plumbing.Dist(), bf16=bf16)
    prompts = [x["prompt"] for x in demos[:5]]
    out = {kind: plumbing.generate(model, tok, prompts, max_new_tokens=10, max_prompt_len=60, cache=kind) for kind in plumbing.CACHE_KINDS}
    assert out["static"][0].shape[1] == 60 and out["dynamic"][0].shape[1] < 60  # static kinds pad to max_prompt_len
    for kind in ("static", "compiled"):
        assert torch.equal(out[kind][2], out["dynamic"][2]) and out[kind][3] == out["dynamic"][3]
    with pytest.raises(ValueError, match="cache 'paged'"):
        plumbing.generate(model, tok, prompts, cache="paged")


def test_bf16_sft_logs_tokens_per_s_of_the_real_tokens(tmp_path):
    out = str(tmp_path / "sft")
    sft.main(sft.parser.parse_args(["--out", out, "--steps", "4", "--save_every", "0", "--bf16", "1", *TINY_RUN]))
    rows = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "perf/tokens_per_s" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    tokenizer = plumbing.load_tokenizer(out)
    train, _ = data.train_and_heldout(data.load_demos, "toy", "train", None, seed=1)
    examples = sft.tokenize_demos(tokenizer, train, 128)
    for r in rows:  # one step per row: tokens/s x seconds = the step's non-pad tokens, prompt + response
        batch = [examples[i] for i in plumbing.batch_indices(r["step"] - 1, 16, len(examples), 1)]
        assert r["perf/tokens_per_s"] * r["perf/step_s"] == pytest.approx(sum(len(p) + len(q) for p, q in batch), rel=1e-3)
        assert "perf/gpu_mem_gb" not in r and all(map(lambda v: v == v, [r["train/loss"]]))  # CPU: no GPU memory


def test_bf16_torchrun_two_processes_equal_one(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_script(["sft.py", "--out", one, "--steps", "4", "--save_every", "0", "--bf16", "1", *TINY_RUN])
    run_script(["sft.py", "--out", two, "--steps", "4", "--save_every", "0", "--bf16", "1", *TINY_RUN], nproc=2)
    la = [r["train/loss"] for r in read_metrics(os.path.join(one, "metrics.jsonl")) if "train/loss" in r]
    lb = [r["train/loss"] for r in read_metrics(os.path.join(two, "metrics.jsonl")) if "train/loss" in r]
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-2)


def test_bf16_ppo_logs_generation_tokens_per_s(toy_sft_dir, tmp_path):
    out = str(tmp_path / "ppo")
    ppo_gi.main(ppo_gi.parser.parse_args(["--sft", toy_sft_dir, "--reward", "gold", "--out", out, "--steps", "2",
                                          "--rollout_batch", "8", "--minibatch", "4", "--save_every", "0", "--eval_prompts", "0",
                                          "--bf16", "1", "--generate_cache", "static"]))
    rows = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "perf/step_s" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["perf/gen_tokens_per_s"] > 0 and r["perf/tokens_per_s"] > 0
    # the last iteration's counts: real tokens − generated tokens = its prompts' tokens, counted here anew
    last = rows[-1]
    n_seq, n_gen = last["perf/tokens_per_s"] * last["perf/step_s"], last["perf/gen_tokens_per_s"] * last["perf/gen_s"]
    tok = plumbing.load_tokenizer(toy_sft_dir)
    prompts = [json.loads(line)["prompt"] for line in open(os.path.join(out, "rollouts.jsonl"))]
    n_prompt = sum(len(plumbing.encode(tok, p, max_len=128)[0]) for p in prompts)
    assert n_seq - n_gen == pytest.approx(n_prompt, abs=0.5) and 0 < n_gen <= 8 * 24


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
