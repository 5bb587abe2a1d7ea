"""evaluate.py and pipeline.sh: the tally against hand-made scores, the llm judge against a local
OpenAI-compatible server (order randomization, parsing, invalid answers, retries), the results.json
schema, and the one-command pipeline end to end with a tiny budget."""
import http.server
import json
import os
import random
import re
import threading

import pytest
import torch

import evaluate
import toy
from conftest import needs_shared, shared


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
    assert len(by_group) == 2 * 2 * len(toy.GROUPS) and {w["group"] for w in by_group} == set(toy.GROUPS)
    assert all(w["tie"] == 100.0 for w in by_group) and sum(w["n"] for w in by_group if w["judge"] == "gold" and w["split"] == "ood") == 10
    assert "| judge | A vs | group | test: Win / Tie / Lose | ood: Win / Tie / Lose |" in (out / "table.md").read_text()
    assert len((out / "responses.jsonl").read_text().splitlines()) == 2 * 2 * 10
    table = (out / "table.md").read_text()
    assert table.startswith("Win / Tie / Lose: % of the prompts of each split (test: 10, ood: 10)")
    assert "| model | split | " + " | ".join(toy.GROUPS) + " | mean | worst group | best − worst |" in table


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
    assert "--judges rm needs --reward DIR (real data: the judge RM)" in error("--data", str(prompts))  # real data: rm
    assert "--splits ood on real data needs --ood_data" in error("--data", str(prompts), "--reward", "r", "--splits", "test", "ood")
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
