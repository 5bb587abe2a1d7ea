"""./pipeline.sh --data hh --preset gpu --tiny on CPU: the real-data pipeline's stages on HH-RLHF with
SmolLM2-135M, a few steps each (a smoke test of the plumbing, not of what the method does)."""
import json
import os
import subprocess
import sys

from conftest import ROOT, needs_shared, needs_smollm2, read_metrics


@needs_shared
@needs_smollm2
def test_pipeline_on_hh_rlhf_with_a_tiny_budget(tmp_path):
    out = tmp_path / "hh"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "pipeline.sh"), "--data", "hh", "--preset", "gpu", "--tiny", "--no-install", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {(w["judge"], w["split"]) for w in results["winrates"]} == {("rm", "test"), ("rm", "ood")}
    assert {"harmless", "helpful"} <= {w["group"] for w in results["winrates_by_group"] if w["split"] == "test"}
    ppo = [r for r in read_metrics(out / "gi_known" / "metrics.jsonl") if "objective/kl" in r]
    assert ppo and "judge/mean" in ppo[-1] and "objective/scores" in ppo[-1] and "groups/size_1" in ppo[-1]
    assert json.loads((out / "gi_known" / "ppo_args.json").read_text())["n_groups"] == 2  # harmless, helpful
