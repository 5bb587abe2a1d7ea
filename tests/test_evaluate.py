"""evaluate.py and pipeline.sh: the tally against hand-made scores, the llm judge against a local
OpenAI-compatible server (order randomization, parsing, invalid answers, retries), the results.json
schema, and the one-command pipeline end to end with a tiny budget."""
import http.server
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import threading

import pytest
import torch

import data
import evaluate
from conftest import ROOT, needs_shared, shared


def test_compare_and_tally_on_hand_made_scores():
    mine, theirs = [0.9, 0.5, 0.5, 0.1, 1.0, 0.30], [0.2, 0.5, 0.7, 0.1, 0.95, 0.35]
    exact = [evaluate.compare(a, b) for a, b in zip(mine, theirs)]
    assert exact == ["win", "tie", "lose", "tie", "win", "lose"]
    assert evaluate.tally(exact) == pytest.approx({"win": 100 * 2 / 6, "tie": 100 * 2 / 6, "lose": 100 * 2 / 6, "invalid": 0.0})
    # a margin turns the close calls (|Δ| ≤ 0.06) into ties, and swapping the sides swaps win and lose
    assert [evaluate.compare(a, b, 0.06) for a, b in zip(mine, theirs)] == ["win", "tie", "lose", "tie", "tie", "tie"]
    assert [evaluate.compare(b, a) for a, b in zip(mine, theirs)] == ["lose", "tie", "win", "tie", "lose", "win"]
    t = evaluate.tally(["win", "invalid", "lose", "tie"])
    assert t == {"win": 25.0, "tie": 25.0, "lose": 25.0, "invalid": 25.0} and sum(t.values()) == 100.0
    with pytest.raises(ValueError):
        evaluate.tally(["win", "draw"])


def test_parse_verdict():
    assert evaluate.parse_verdict("A is right.\n[[A]]") == "A"
    assert evaluate.parse_verdict("first I thought [[A]], but on reflection [[B]]") == "B"
    assert evaluate.parse_verdict("[[ tie ]]") == "tie" and evaluate.parse_verdict("[[C]]") == "tie"
    assert evaluate.parse_verdict("Response A is better.") is None and evaluate.parse_verdict(None) is None


class _Judge(http.server.BaseHTTPRequestHandler):
    """Answers deterministically from the prompt: the response holding GOOD wins; a conversation
    with GARBLE gets no verdict; FLAKY fails once per conversation, then answers; DOWN always fails."""
    seen, calls, auth = [], {}, set()

    def do_POST(self):
        _Judge.auth.add(self.headers.get("Authorization"))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        conv = re.search(r"\[Conversation\]\n(.*?)\n\n\[Response A\]", text, re.S).group(1)
        a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", text, re.S).group(1)
        b = re.search(r"\[Response B\]\n(.*?)\n\nFirst explain", text, re.S).group(1)
        _Judge.calls[conv] = _Judge.calls.get(conv, 0) + 1
        if "DOWN" in conv or ("FLAKY" in conv and _Judge.calls[conv] == 1):
            self.send_response(500)
            self.end_headers()
            return
        _Judge.seen.append(("GOOD" in a, "GOOD" in b))
        answer = "I cannot decide." if "GARBLE" in conv else \
            "Better.\n[[A]]" if "GOOD" in a and "GOOD" not in b else "Better.\n[[B]]" if "GOOD" in b and "GOOD" not in a else "Same.\n[[tie]]"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Judge.seen.clear()
    _Judge.calls.clear()
    _Judge.auth.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_llm_judge_order_randomization_parsing_invalid_and_retries(judge_server, monkeypatch):
    sleeps = []
    monkeypatch.setattr(evaluate.time, "sleep", sleeps.append)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    args = evaluate.parser.parse_args(["--model", "m=x", "--opponents", "o=y", "--judges", "llm", "--judge_url", judge_server,
                                       "--judge_model", "test", "--judge_retries", "2", "--judge_timeout", "5"])
    n = 40
    prompts = [f"q{i}" for i in range(n)] + ["q GARBLE", "q FLAKY", "q DOWN", "q same"]
    mine = [f"GOOD {i}" if i % 4 else f"bad {i}" for i in range(n)] + ["GOOD", "GOOD", "GOOD", "identical"]
    theirs = [f"bad {i}" if i % 4 else f"GOOD {i}" for i in range(n)] + ["bad", "bad", "bad", "identical"]
    outcomes = evaluate.llm_outcomes(args, prompts, mine, theirs, random.Random(0))
    # un-swapped: the GOOD side wins whichever position it was shown in
    assert outcomes[:n] == ["lose" if i % 4 == 0 else "win" for i in range(n)]
    positions = {s for s in _Judge.seen}
    assert (True, False) in positions and (False, True) in positions  # both orders were shown
    shown_first = sum(a for a, _ in _Judge.seen[:n])
    assert 10 <= shown_first <= 30  # about half the model's GOOD answers were shown as A
    assert outcomes[n:] == ["invalid", "win", "invalid", "tie"]
    assert _Judge.calls["q FLAKY"] == 2 and _Judge.calls["q DOWN"] == 3  # 1 retry, then 2 retries exhausted
    assert "q same" not in _Judge.calls  # identical responses tie without a request
    assert _Judge.auth == {"Bearer test-key"}  # the key comes from the environment variable
    assert sleeps == [1.0, 1.0, 2.0]  # bounded exponential backoff
    t = evaluate.tally(outcomes)
    assert t["invalid"] == pytest.approx(100 * 2 / (n + 4))


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Server B of the redirect test: records every request (port, method, path, headers) and answers
    any with a verdict."""
    requests = []

    def do_POST(self):
        _Recorder.requests.append((self.server.server_address[1], self.command, self.path, dict(self.headers)))
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": "[[A]]"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST  # urllib follows a POST's 302 with a GET

    def log_message(self, *args):
        pass


class _Redirector(_Recorder):
    """Server A: answers a judge request with 302, to server B (`target`) or, for 'same-host', to
    another path of its own (which answers with a verdict, as B does)."""
    target = None

    def do_POST(self):
        _Recorder.requests.append((self.server.server_address[1], self.command, self.path, dict(self.headers)))
        same = b"same-host" in self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(302)
        self.send_header("Location", "/v1/moved" if same else _Redirector.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = _Recorder.do_POST


def test_the_llm_judge_refuses_redirects_and_never_resends_the_key(monkeypatch, capsys):
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), h) for h in (_Redirector, _Recorder)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    a_port, b_port = (s.server_address[1] for s in servers)
    _Recorder.requests.clear()
    _Redirector.target = f"http://127.0.0.1:{b_port}/v1/chat/completions"  # another port: another host
    sleeps = []
    monkeypatch.setattr(evaluate.time, "sleep", sleeps.append)
    monkeypatch.setenv("OPENAI_API_KEY", "secret-key")
    args = evaluate.parser.parse_args(["--model", "m=x", "--opponents", "o=y", "--judges", "llm", "--judge_url",
                                       f"http://127.0.0.1:{a_port}/v1", "--judge_model", "test", "--judge_retries", "2"])
    try:
        outcomes = evaluate.llm_outcomes(args, ["q1", "q2", "q same-host"], ["x1", "x2", "x3"], ["y1", "y2", "y3"], random.Random(0))
    finally:
        for s in servers:
            s.shutdown()
    assert outcomes == ["invalid"] * 3  # no verdict from a redirect's target is counted
    assert not any("Authorization" in h for port, _, _, h in _Recorder.requests if port == b_port)  # B never saw the key
    # refused, not followed (same host included): one POST per item to --judge_url, not retried
    assert [(port, method, path) for port, method, path, _ in _Recorder.requests] == [(a_port, "POST", "/v1/chat/completions")] * 3
    assert sleeps == [] and all(h["Authorization"] == "Bearer secret-key" for *_, h in _Recorder.requests)
    printed = capsys.readouterr().out
    assert printed.count(f"a redirect to http://127.0.0.1:{b_port}/") == 1 and printed.count("/v1/moved") == 1  # once each


def test_results_schema_and_identical_models_tie(toy_sft_dir, tmp_path, monkeypatch, judge_server):
    out = tmp_path / "eval"
    monkeypatch.setattr(evaluate.time, "sleep", lambda s: None)
    evaluate.main(evaluate.parser.parse_args([
        "--model", f"A={toy_sft_dir}", "--opponents", f"B={toy_sft_dir}", "--judges", "gold", "llm",
        "--judge_url", judge_server, "--judge_model", "test", "--splits", "test", "ood", "--n_prompts", "10", "--out", str(out)]))
    results = json.loads((out / "results.json").read_text())
    assert len(results["winrates"]) == 4  # 2 judges × 1 opponent × 2 splits
    for w in results["winrates"]:
        assert set(w) >= {"judge", "model", "opponent", "split", "win", "tie", "lose", "invalid"}
        assert (w["model"], w["opponent"]) == ("A", "B") and w["tie"] == 100.0  # same weights, greedy: same answers
    groups = results["groups"]
    assert {g["split"] for g in groups} == {"test", "ood"} and {g["model"] for g in groups} == {"A", "B"}
    assert all(set(g) >= {"model", "split", "group", "gold_mean"} and 0 <= g["gold_mean"] <= 1 for g in groups)
    assert "| gold | B |" in (out / "table.md").read_text()
    by_group = results["winrates_by_group"]  # the built-in task's prompts carry their true group
    assert len(by_group) == 2 * 2 * len(data.GROUPS) and {w["group"] for w in by_group} == set(data.GROUPS)
    assert all(w["tie"] == 100.0 for w in by_group) and sum(w["n"] for w in by_group if w["judge"] == "gold" and w["split"] == "ood") == 10
    assert "| judge | A vs | group | test: Win / Tie / Lose | ood: Win / Tie / Lose |" in (out / "table.md").read_text()
    assert len((out / "responses.jsonl").read_text().splitlines()) == 2 * 2 * 10
    table = (out / "table.md").read_text()
    assert table.startswith("Win / Tie / Lose: % of the prompts of each split (test: 10, ood: 10)")
    assert "| model | split | " + " | ".join(data.GROUPS) + " | mean | worst group | best − worst |" in table


def test_plots_are_written(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed (pip install -r requirements.txt)")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    rows = [{"model": m, "split": "test", "group": g, "gold_mean": x} for m in "AB" for g, x in (("copy", 0.5), ("sum", 0.2))]
    evaluate.plot(str(tmp_path), {"A": str(run)}, rows, {("A", "test"): [0.1, 0.5, 0.9]})
    for png in ("reward_distribution.png", "gold_per_group.png", "training_curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_any_prompt_source_with_the_llm_judge(toy_sft_dir, tmp_path, judge_server):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"\n\nHuman: Say {w}.\n\nAssistant:"}) + "\n" for w in "abcdef"))
    out = tmp_path / "eval"
    evaluate.main(evaluate.parser.parse_args([
        "--model", f"A={toy_sft_dir}", "--opponents", f"B={toy_sft_dir}", "--data", str(prompts), "--split", "all",
        "--judges", "llm", "--judge_url", judge_server, "--judge_model", "test", "--out", str(out)]))
    results = json.loads((out / "results.json").read_text())
    assert [(w["judge"], w["split"], w["tie"], w["n"]) for w in results["winrates"]] == [("llm", "all", 100.0, 6)]
    assert results["groups"] == [] and results["winrates_by_group"] == []  # these prompts carry no group
    with pytest.raises(SystemExit):  # the gold judge needs the built-in task
        evaluate.main(evaluate.parser.parse_args(["--model", f"A={toy_sft_dir}", "--opponents", f"B={toy_sft_dir}",
                                                  "--data", str(prompts), "--judges", "gold"]))


def test_defaults_and_their_errors_name_the_flag(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "\n\nHuman: Hi.\n\nAssistant:"}) + "\n")

    def error(*argv):  # every check runs before any model is loaded
        with pytest.raises(SystemExit):
            evaluate.main(evaluate.parser.parse_args(["--model", "A=nowhere", "--opponents", "B=nowhere", *argv]))
        return capsys.readouterr().err

    assert "--judges gold rm" not in error() and "--judges rm needs --reward DIR" in error()  # toy: gold and rm
    assert "--judges rm needs --reward DIR (real data: a judge RM" in error("--data", str(prompts))  # real data: rm
    assert "--splits ood on real data needs --ood_data SPEC" in error("--data", str(prompts), "--reward", "r", "--splits", "test", "ood")
    assert "--ood_data is for real data" in error("--reward", "r", "--ood_data", str(prompts))
    assert "--judges gold is the built-in task's judge" in error("--data", str(prompts), "--judges", "gold")


@needs_shared
def test_real_data_by_a_judge_rm_per_group_and_out_of_domain(toy_sft_dir, tmp_path):
    """HH-RLHF with --group_by harm, the defaults otherwise (judge rm, split test), PKU-SafeRLHF as the
    ood column; a 3-step judge RM on the `judge` split; two tiny models (their text is garbage)."""
    import reward
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    hh = shared("data", "hh-rlhf")
    judge_rm = str(tmp_path / "judge_rm")
    reward.main(reward.parser.parse_args([
        "--sft", toy_sft_dir, "--data", hh, "--split", "judge[:64]", "--out", judge_rm, "--steps", "3", "--max_len", "256", "--save_every", "0", "--stats_pairs", "16", "--batch_size", "16",
        "--log_every", "1", "--eval_every", "1000", "--warmup", "2"]))
    other = tmp_path / "other"  # the same model with its weights perturbed: other answers
    shutil.copytree(toy_sft_dir, other)
    weights = load_file(other / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in weights.items()}, other / "model.safetensors", {"format": "pt"})
    out = tmp_path / "eval"
    evaluate.main(evaluate.parser.parse_args([
        "--model", f"A={toy_sft_dir}", "--opponents", f"B={other}", "--data", hh, "--group_by", "harm", "--n_prompts", "8",
        "--reward", judge_rm, "--ood_data", shared("data", "ood", "pku-saferlhf", "alpaca-7b-test.head10.jsonl"),
        "--max_new_tokens", "8", "--out", str(out)]))
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["judges"] == ["rm"] and results["settings"]["splits"] == ["test", "ood"]
    assert [(w["judge"], w["split"], w["n"]) for w in results["winrates"]] == [("rm", "test", 8), ("rm", "ood", 8)]
    by_group = results["winrates_by_group"]
    assert {w["group"] for w in by_group if w["split"] == "test"} == {"harmless", "helpful"}
    assert sum(w["n"] for w in by_group if w["split"] == "ood") == 8  # PKU's own groups (harm categories)
    for w in results["winrates"] + by_group:
        assert w["win"] + w["tie"] + w["lose"] + w["invalid"] == pytest.approx(100)
    assert any(w["tie"] < 100 for w in results["winrates"])  # the two models do differ
    table = (out / "table.md").read_text()
    assert "| judge | A vs | test: Win / Tie / Lose | ood: Win / Tie / Lose |" in table
    assert "| rm | B | harmless | " in table and "| rm | B | helpful | " in table


def test_pipeline_end_to_end_with_a_tiny_budget(tmp_path):
    env = {**os.environ, "SFT_STEPS": "10", "RM_STEPS": "3", "DPO_STEPS": "3", "PPO_STEPS": "2", "PPO_BATCH": "16", "EVAL_PROMPTS": "4",
           "HELDOUT_PAIRS": "test[:32]", "STATS_PAIRS": "64",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = ["bash", os.path.join(ROOT, "pipeline.sh"), "--no-install", "--seed", "3", "--out", str(tmp_path / "p")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "p" / "eval" / "results.json").read_text())
    opponents = {w["opponent"] for w in results["winrates"]}
    assert opponents == {"SFT", "PPO", "PPO w/ KL", "DPO", "GI-PPO fixed KL", "GI-PPO β_policy 0", "PPO (gold reward)", "PPO (shuffled)"}
    assert {w["judge"] for w in results["winrates"]} == {"gold", "rm"} and {w["split"] for w in results["winrates"]} == {"test", "ood"}
    assert all(abs(w["win"] + w["tie"] + w["lose"] + w["invalid"] - 100) < 1e-6 for w in results["winrates"])
    assert "Win / Tie / Lose" in proc.stdout
    # --runs: one row per PPO run, its RL gold the mean of the last iterations' gold/mean
    table = evaluate.run_table([str(tmp_path / "p" / "gi_ppo"), str(tmp_path / "p" / "ppo")], last=2)
    rows = [json.loads(line) for line in (tmp_path / "p" / "gi_ppo" / "metrics.jsonl").read_text().splitlines()]
    gold = [r["gold/mean"] for r in rows if "objective/kl" in r][-2:]
    gi_row = table.splitlines()[2].split(" | ")
    assert len(table.splitlines()) == 4 and gi_row[1:3] == ["0.1", "0.5"] and float(gi_row[4]) == pytest.approx(sum(gold) / 2, abs=5e-4)
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipped") == 11  # every stage's output exists
    # --study from the same SFT and RM: three groupings × two β_policy, the controls, GR-DPO, one evaluation
    study = subprocess.run(cmd + ["--study"], cwd=ROOT, env={**env, "STUDY_BETAS": "1", "KL_MATCH_TRIES": "1"},
                           capture_output=True, text=True, timeout=600)
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    results = tmp_path / "p" / "study" / "eval" / "results.json"
    names = [evaluate.parse_named(o)[0] for o in json.loads(results.read_text())["settings"]["opponents"]]
    assert names == [f"GI ({g}) β 1" for g in ("x,y", "x", "known")] + ["PPO w/ KL", "PPO (rank KL)", "DPO", "GR-DPO", "SFT"]
    table = evaluate.study_table([str(results), str(results)], str(tmp_path / "agg"))
    assert len(table.splitlines()) == 4 + 9 and (tmp_path / "agg" / "study.png").exists()
    assert "| PPO w/ KL (KL-matched) | " in table and "+0.0 [+0.0, +0.0]" in table.splitlines()[4]  # itself: all ties
    versus_sft = evaluate.study_table([str(results)], str(tmp_path / "agg"), versus="SFT")
    assert [line for line in versus_sft.splitlines() if line.startswith("| SFT |")][0].count("+0.0 [+0.0, +0.0]") == 2


def test_the_kl_matched_search_interpolates_eta_in_log_log(tmp_path):
    def run(name, eta, kl):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ppo_args.json").write_text(json.dumps({"kl_coef": eta}))
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps({"objective/kl": kl}) + "\n" for _ in range(12)))
        (tmp_path / name / "config.json").write_text("{}")  # finished
        return str(tmp_path / name)
    target, first = run("gi", 0.5, 0.5), run("a", 0.5, 0.3)
    assert evaluate.match_kl(target, [first]) == f"next 0.3 {first}"  # one candidate: KL ∝ 1/η, 0.5·0.3/0.5
    # bracketing candidates: log η interpolated at log KL = log 0.5 between (0.2, 0.8) and (0.5, 0.3)
    slope = (math.log(0.8) - math.log(0.3)) / (math.log(0.2) - math.log(0.5))
    verdict, eta, closest = evaluate.match_kl(target, [first, run("b", 0.2, 0.8)]).split()
    assert verdict == "next" and float(eta) == pytest.approx(0.2 * math.exp((math.log(0.5) - math.log(0.8)) / slope), rel=2e-3)
    assert evaluate.match_kl(target, [first, run("c", 0.31, 0.46)]) == f"match {tmp_path / 'c'}"  # within 10%
    # a run that has not finished (no config.json: failed, or still running) is named, not read as KL 1e-6
    os.remove(tmp_path / "c" / "config.json")
    with pytest.raises(SystemExit, match=r"--match_kl: .*/c is not a finished ppo_gi.py run \(no config.json; it may still be running"):
        evaluate.match_kl(target, [first, str(tmp_path / "c")])
    with pytest.raises(SystemExit, match=r"--runs: .*/nothing is not a finished ppo_gi.py run \(no ppo_args.json, config.json, metrics.jsonl\)"):
        evaluate.run_table([str(tmp_path / "nothing")])


def test_aggregate_mean_and_std_over_runs(tmp_path):
    paths = []
    for k, (win, gold) in enumerate([(40.0, (0.2, 0.8)), (60.0, (0.4, 1.0))]):
        w = {"judge": "gold", "model": "M", "opponent": "O", "split": "test", "win": win, "tie": 100 - win - 10, "lose": 10.0, "invalid": 0.0}
        r = {"winrates": [w], "winrates_by_group": [{**w, "group": "g1", "n": 5, "win": win / 2, "tie": 90 - win / 2}],
             "groups": [{"model": "M", "split": "test", "group": "g1", "gold_mean": gold[0]},
                        {"model": "M", "split": "test", "group": "g2", "gold_mean": gold[1]}]}
        paths.append(str(tmp_path / f"r{k}.json"))
        with open(paths[-1], "w") as f:
            json.dump(r, f)
    text = evaluate.aggregate(paths)
    assert "| gold | O | 50.0 ± 10.0 / 40.0 ± 10.0 / 10.0 ± 0.0 |" in text  # np.std: population std
    assert "| gold | O | g1 | 25.0 ± 5.0 / 65.0 ± 5.0 / 10.0 ± 0.0 (n 5) |" in text
    assert "| M | test | 0.300 | 0.900 | 0.600 ± 0.100 | 0.600 ± 0.000 |" in text


def _ppo_run(path, judge, slope, n=7, no_gi=False):
    """A synthetic ppo_gi.py run: ppo_args.json and a metrics.jsonl whose judge (`gold` or `judge`)
    score moves by `slope` per iteration while the proxy RM's score (objective/scores) rises."""
    path.mkdir()
    (path / "ppo_args.json").write_text(json.dumps({"no_gi": no_gi, "beta_policy": 0.1, "lr": 1e-5, "kl_coef": 0.05, "rollout_batch": 64}))
    groups = ("copy", "summary") if judge == "gold" else ("harmless", "helpful")
    rows = [{"step": 0, "train/loss": 1.0}] + [
        {"step": i, "objective/kl": 0.1 * i, "objective/scores": 1.0 + 0.5 * i, f"{judge}/mean": 0.5 + slope * i,
         f"{judge}/group/{groups[0]}": 0.6, f"{judge}/group/{groups[1]}": 0.4 - 0.01 * i, "groups/size_0": 20.0 + i, "groups/size_1": 44.0 - i,
         f"kl/group/{groups[0]}": 0.2 * i, f"kl/group/{groups[1]}": 0.05, "kl/mean": 0.1 * i}
        for i in range(1, n + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.json").write_text("{}")  # a finished run
    return str(path)


def test_gold_vs_kl_curve_is_computed_and_plotted(tmp_path):
    """The over-optimization plot from each PPO run's metrics.jsonl: running means of KL, of the
    judge's score (gold on the built-in task, judge/* from the judge RM on real data) and of the proxy's."""
    runs = {"PPO": _ppo_run(tmp_path / "PPO", "gold", 0.1), "GI-PPO": _ppo_run(tmp_path / "GI-PPO", "gold", -0.1),
            "SFT": str(tmp_path / "sft_without_metrics")}
    curve = evaluate.gold_vs_kl(runs["PPO"], window=2)
    assert curve["judge"] == "gold" and set(curve["scores"]) == {"mean", "copy", "summary"} and len(curve["kl"]) == 7
    assert curve["kl"][:2] == pytest.approx([0.1, 0.15]) and curve["scores"]["mean"][-1] == pytest.approx(0.5 + 0.1 * 6.5)
    assert curve["proxy"][-1] == pytest.approx(1.0 + 0.5 * 6.5)
    assert evaluate.gold_vs_kl(runs["SFT"]) == {}
    # a real-data run that logged the judge RM (ppo_gi.py --judge_reward) instead of gold: the same curve
    judged = evaluate.gold_vs_kl(_ppo_run(tmp_path / "real", "judge", -0.05), window=2)
    assert judged["judge"] == "judge" and set(judged["scores"]) == {"mean", "harmless", "helpful"}
    assert judged["scores"]["mean"][-1] == pytest.approx(0.5 - 0.05 * 6.5) and judged["proxy"][-1] == pytest.approx(4.25)
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed: no plots")
    for name, dirs in (("toy", runs), ("real", {"PPO": str(tmp_path / "real")})):
        evaluate.plot_gold_vs_kl(str(tmp_path / name), dirs)
        assert (tmp_path / name / "gold_vs_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_table_reports_the_judge_and_the_proxy(tmp_path):
    toy = _ppo_run(tmp_path / "toy", "gold", 0.1)
    real, plain = _ppo_run(tmp_path / "real", "judge", -0.05), _ppo_run(tmp_path / "plain", "judge", 0.0, no_gi=True)
    table = evaluate.run_table([toy], last=2).splitlines()
    assert table[0].startswith("| run | β_policy | η | RL gold, first 2 | RL gold, last 2 | worst group (gold) | proxy RM score |")
    assert table[2].split(" | ")[1:9] == ["0.1", "0.05", "0.650", "1.150", "summary 0.335", "4.25", "0.65", "0.7"]
    table = evaluate.run_table([real, plain], last=2).splitlines()
    assert "| RL judge RM, first 2 | RL judge RM, last 2 | worst group (judge RM) |" in table[0] and len(table) == 4
    # last 2 iterations (6, 7): judge 0.5 − 0.05·6.5, helpful 0.4 − 0.01·6.5; the first 2 (1, 2): 0.5 − 0.05·1.5
    assert table[2].split(" | ")[3:7] == ["0.425", "0.175", "helpful 0.335", "4.25"]
    assert table[3].split(" | ")[1] == "0" and table[3].split(" | ")[10] == ""  # PPO: no GI, no inferred groups
    # the KL on each true group over the last 2 iterations (6, 7): 0.2·6.5 and 0.05; kl/mean is not a group
    assert table[2].split(" | ")[9] == "harmless 1.30, helpful 0.05"
    # a run that logged no judge at all: empty judge cells, the proxy still there
    bare = tmp_path / "bare"
    _ppo_run(bare, "gold", 0.0)
    (bare / "metrics.jsonl").write_text("".join(json.dumps({"objective/kl": 0.1, "objective/scores": 2.0, "groups/size_0": 32.0}) + "\n"
                                                for _ in range(3)))
    assert evaluate.run_table([str(bare)]).splitlines()[2].split(" | ")[3:7] == ["", "", "", "2.00"]


def test_an_unreachable_llm_judge_gives_up_with_a_non_zero_exit(judge_server, monkeypatch):
    """A judge that answers nothing (DOWN: every request fails) stops the run after --judge_give_up
    requests in a row (before: every item was tried, with retries, and counted invalid); failures
    between answers are counted invalid, as before."""
    monkeypatch.setattr(evaluate.time, "sleep", lambda s: None)
    args = evaluate.parser.parse_args(["--model", "m=x", "--opponents", "o=y", "--judges", "llm", "--judge_url", judge_server,
                                       "--judge_model", "test", "--judge_retries", "0", "--judge_give_up", "3"])
    mixed = evaluate.llm_outcomes(args, [f"q{i}" + (" DOWN" if i % 2 else "") for i in range(8)], ["GOOD"] * 8, ["bad"] * 8,
                                  random.Random(0))
    assert mixed == ["win", "invalid"] * 4  # every other request fails: never three in a row
    with pytest.raises(SystemExit, match="gave no answer to 3 requests in a row .*stopped, nothing written") as e:
        evaluate.llm_outcomes(args, [f"r{i} DOWN" for i in range(10)], ["GOOD"] * 10, ["bad"] * 10, random.Random(0))
    assert e.value.code != 0 and sum(k.endswith("DOWN") for k in _Judge.calls) == 4 + 3


def test_a_reward_model_with_nan_scores_or_no_stats_is_named_and_nothing_is_written(toy_sft_dir, tmp_path):
    import plumbing
    import reward
    tok = plumbing.load_tokenizer(toy_sft_dir)
    rm = reward.load_reward_model(toy_sft_dir, tok)
    with torch.no_grad():
        rm.hf.score.weight.fill_(float("nan"))
    nan_rm, no_stats = str(tmp_path / "nan_rm"), str(tmp_path / "critic_like")
    plumbing.save_model(rm, tok, nan_rm, plumbing.Dist(), extra={"reward_stats.json": {"mean": 0.0, "std": 1.0}})
    plumbing.save_model(rm, tok, no_stats, plumbing.Dist())
    base = ["--model", f"A={toy_sft_dir}", "--opponents", f"B={toy_sft_dir}", "--n_prompts", "4", "--splits", "test", "--judges", "gold", "rm"]
    out = tmp_path / "eval"
    with pytest.raises(SystemExit, match="gave 4 non-finite score.* to A's test responses: a broken reward model; nothing written"):
        evaluate.main(evaluate.parser.parse_args(base + ["--reward", nan_rm, "--out", str(out)]))
    assert not out.exists() or os.listdir(out) == []  # (before: a table of ties, then a crash in the plots)
    with pytest.raises(SystemExit, match="critic_like: no reward_stats.json"):
        evaluate.main(evaluate.parser.parse_args(base + ["--reward", no_stats, "--out", str(tmp_path / "e2")]))
