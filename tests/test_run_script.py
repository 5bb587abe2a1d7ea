"""tests/conftest.run_script: up to two retries of a torchrun whose rank aborted with no Python error (a gloo
teardown flake), and none for any other failure; on fake processes, so nothing is launched."""
import subprocess

import pytest

import conftest


def fake_runs(monkeypatch, results):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        code, err = results[len(calls) - 1]
        return subprocess.CompletedProcess(cmd, code, stdout="", stderr=err)
    monkeypatch.setattr(conftest.subprocess, "run", run)
    return calls


ABORT = f"{conftest.TEARDOWN_ABORT}\nTraceback (most recent call last):\n  ChildFailedError"


def test_a_teardown_abort_is_retried_twice_at_most(monkeypatch):
    calls = fake_runs(monkeypatch, [(1, ABORT), (0, "")])
    with pytest.warns(UserWarning, match="retried"):
        conftest.run_script(["x.py"], nproc=2)
    assert len(calls) == 2
    calls = fake_runs(monkeypatch, [(1, ABORT), (1, ABORT), (1, ABORT), (0, "")])  # three times: the test fails
    with pytest.warns(UserWarning), pytest.raises(AssertionError):
        conftest.run_script(["x.py"], nproc=2)
    assert len(calls) == 1 + conftest.RETRIES == 3


def test_other_failures_are_not_retried(monkeypatch):
    for nproc, err in ((2, "Traceback (most recent call last):\n  ValueError\n" + ABORT), (2, "killed"), (1, ABORT)):
        calls = fake_runs(monkeypatch, [(1, err), (0, "")])
        with pytest.raises(AssertionError):
            conftest.run_script(["x.py"], nproc=nproc)
        assert len(calls) == 1
