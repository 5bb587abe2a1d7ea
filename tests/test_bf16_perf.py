"""bf16 autocast (the CUDA default, exercised here on CPU), the perf/* metrics and generate()'s KV
cache kinds (bench/'s own tests: tests/bench/)."""
import json
import os

import pytest
import torch

import data
import plumbing
import ppo_gi
import sft
from conftest import read_metrics, run_script

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


@pytest.mark.slow
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
