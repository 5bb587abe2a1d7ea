"""Run a stage script as `python SCRIPT ARGS...` and kill its process (os._exit, as a kill -9
would: no cleanup) at a chosen point, for the resume tests:
    python tests/die_at.py log:7 sft.py ...    right after the metrics row of step 7 is written
    python tests/die_at.py save sft.py ...     at the first save_model, after the last checkpoint"""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plumbing  # noqa: E402

when, script = sys.argv[1], sys.argv[2]
if when.startswith("log:"):
    log = plumbing.MetricsLog.log

    def log_then_die(self, step, metrics):
        log(self, step, metrics)
        if step == int(when[4:]):
            os._exit(9)
    plumbing.MetricsLog.log = log_then_die
else:
    plumbing.save_model = lambda *a, **k: os._exit(9)
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
