"""./pipeline.sh --data hh --preset gpu --tiny on CPU: every stage of the real-data pipeline on HH-RLHF,
a step or two each (a smoke test of the plumbing, not of what the method does), from a model of
SmolLM2's architecture and tokenizer at a few layers of width 64 (--model DIR), so the test takes a
minute, not five: the 135M model's own --tiny run (README, "Real data") and the CPU preset's
(RESULTS.md) are the same command with the default --model."""
import json
import re

import pytest

from conftest import needs_shared, needs_smollm2, read_metrics, run_pipeline


@pytest.mark.slow
@needs_shared
@needs_smollm2
def test_pipeline_on_hh_rlhf_with_a_tiny_budget(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    import plumbing
    folder, name = plumbing.gguf_location("smollm2")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)  # SmolLM2-135M's: Llama, tied embeddings
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16})
    tok = plumbing.load_tokenizer("smollm2")
    config.vocab_size = len(tok)
    model_dir = tmp_path / "small-smollm2"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "hh"
    proc = run_pipeline("pipeline.sh", "--data", "hh", "--preset", "gpu", "--tiny", "--model", str(model_dir), "--no_install", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {(w["judge"], w["split"]) for w in results["winrates"]} == {("rm", "test"), ("rm", "ood")}
    assert {w["opponent"] for w in results["winrates"]} == {"SFT", "DPO", "PPO", "PPO w/ KL", "GI-PPO fixed KL", "GI-PPO β_policy 0",
                                                           "GI-PPO (known groups)", "PPO (shuffled)"}  # every stage ran
    assert {"harmless", "helpful"} <= {w["group"] for w in results["winrates_by_group"] if w["split"] == "test"}
    ppo = [r for r in read_metrics(out / "gi_known" / "metrics.jsonl") if "objective/kl" in r]
    assert ppo and "judge/mean" in ppo[-1] and "objective/scores" in ppo[-1] and "groups/size_1" in ppo[-1]
    assert json.loads((out / "gi_known" / "ppo_args.json").read_text())["n_groups"] == 2  # harmless, helpful
    for rm in ("reward", "judge_rm"):  # of the 4 test pairs, those --max_len 96 leaves identical are dropped
        assert 1 <= int(re.search(rf"== {rm}: held-out accuracy \S+ on (\d+) test pairs", proc.stdout).group(1)) <= 4, proc.stdout[-2000:]
