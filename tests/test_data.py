import gzip
import json
import random
import re
import subprocess
import sys

import pytest

import data
import toy
from conftest import ROOT, needs_shared, shared

HH_SUBSETS = {"harmless-base": 2312, "helpful-base": 2354, "helpful-online": 1137, "helpful-rejection-sampled": 2749}


@needs_shared
@pytest.mark.parametrize("subset", sorted(HH_SUBSETS))
def test_hh_subset_loaded_plus_skipped_is_every_record(subset):
    path = shared("data", "hh-rlhf", subset, "test.jsonl.gz")
    with gzip.open(path, "rt") as f:
        n_lines = sum(1 for line in f if line.strip())
    assert n_lines == HH_SUBSETS[subset]
    pairs, skipped = data.read_pairs_file(path)
    assert len(pairs) + sum(skipped.values()) == n_lines
    assert len(pairs) > 0.98 * n_lines  # "a few dozen are unusable"
    for p in pairs[:50]:
        assert p["prompt"].startswith("\n\nHuman: ") and p["prompt"].endswith("\n\nAssistant:")
        assert p["chosen"] != p["rejected"] and p["chosen"].strip() and p["rejected"].strip()


@needs_shared
def test_hh_directory_loads_all_subsets_and_reports_skips(capsys):
    pairs = data.load_pairs(shared("data", "hh-rlhf"), "all")
    out = capsys.readouterr().out
    assert "skipped" in out and "chosen == rejected" in out
    n_skipped = int(out.split("skipped ")[1].split()[0])
    assert len(pairs) + n_skipped == sum(HH_SUBSETS.values()) == 8552
    assert [p["group"] for p in pairs[::2000]] == ["harmless-base"] * 2 + ["helpful-base"] + ["helpful-rejection-sampled"] * 2  # file order
    assert len(data.load_pairs(shared("data", "hh-rlhf"), "test[:10]")) == 10
    demos, prompts = data.load_demos(shared("data", "hh-rlhf"), "all[:20]"), data.load_prompts(shared("data", "hh-rlhf"), "test[:20]")
    assert demos[0] == {"prompt": pairs[0]["prompt"], "response": pairs[0]["chosen"], "group": "harmless-base"}
    assert 0 < len(prompts) <= 20 and all(p["prompt"].endswith("\n\nAssistant:") for p in prompts)


@needs_shared
def test_summarize_from_feedback_comparisons_load():
    folder = shared("data", "tldr", "comparisons")
    pairs = data.load_pairs(folder, "all")
    assert len(pairs) == 1097 + 674
    assert len(data.load_pairs(folder, "valid1")) == 265 + 120
    p = pairs[0]
    assert p["prompt"].startswith("\n\nHuman: SUBREDDIT: r/") and p["prompt"].endswith("TL;DR:\n\nAssistant:")
    raw = json.loads(open(shared("data", "tldr", "comparisons", "batch13.json")).readline())
    assert p["chosen"].strip() == raw["summaries"][raw["choice"]]["text"].strip()
    demos = data.load_demos(shared("data", "tldr", "comparisons", "batch18.json"), "all")
    refs = [x for x, pr in zip(demos, data.load_pairs(shared("data", "tldr", "comparisons", "batch18.json"), "all")) if pr["ref"]]
    assert refs and all(x["response"].strip() for x in refs)
    cnn, skipped = data.read_pairs_file(shared("data", "ood", "cnndm-comparisons", "cnndm0.json"))
    assert len(cnn) + sum(skipped.values()) == 437 and set(skipped) == {"empty response"}  # 12 empty summaries
    assert cnn[0]["prompt"].startswith("\n\nHuman: ARTICLE: ")
    pku = data.load_pairs(shared("data", "ood", "pku-saferlhf", "alpaca-7b-test.head10.jsonl"), "all")
    assert len(pku) == 10


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " a", "rejected": " b"})
    path.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(data.DataError, match=r"pairs\.jsonl, line 3: malformed JSON"):
        data.load_pairs(str(path), "train")
    path.write_text(good + "\n" + json.dumps({"prompt": "x", "chosen": " a"}) + "\n")
    with pytest.raises(data.DataError, match=r"line 2: missing key\(s\) \['rejected'\]"):
        data.load_pairs(str(path), "train")
    with pytest.raises(data.DataError, match="not 'toy', an existing file"):
        data.load_pairs(str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(data.DataError, match="split 'te st'"):
        data.load_pairs("toy", "te st")


def test_unusable_records_are_skipped_and_counted(tmp_path, capsys):
    rows = [{"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"},
            {"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"},
            {"chosen": "no assistant turn", "rejected": "at all"},
            {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: x"}]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = data.load_pairs(str(tmp_path), "all")
    assert pairs == [{"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": " yes", "rejected": " no"}]
    out = capsys.readouterr().out
    assert "loaded 1 records, skipped 3" in out
    assert "1 chosen == rejected" in out and "1 no Assistant turn" in out and "1 empty response" in out


def _toy_digest():
    code = ("import data, hashlib, json; print(hashlib.sha256(json.dumps([data.load_demos('toy','train'),"
            "data.load_pairs('toy','train'), data.load_prompts('toy','rl'), data.load_prompts('toy','test'),"
            "data.load_prompts('toy','ood')]).encode()).hexdigest())")
    return code


def test_builtin_task_is_deterministic_byte_for_byte():
    digests = {subprocess.run([sys.executable, "-c", _toy_digest()], cwd=ROOT, capture_output=True, text=True,
                              env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert len(digests) == 1 and len(next(iter(digests)).strip()) == 64


def test_builtin_task_shape():
    assert len(data.load_demos("toy", "train")) == 20000
    test, ood, rl = (data.load_prompts("toy", s) for s in ("test", "ood", "rl"))
    for split in (test, ood, rl):
        groups = [toy.true_group(x["prompt"]) for x in split]
        assert set(groups) == set(toy.GROUPS) and all(x["prompt"].endswith("\n\nAssistant:") for x in split)
    train_prompts = {x["prompt"] for x in data.load_demos("toy", "train")} | {x["prompt"] for x in rl}
    assert not train_prompts & {x["prompt"] for x in ood}
    assert not train_prompts & {x["prompt"] for x in test if toy.true_group(x["prompt"]) not in toy.TABLE_GROUPS}


@pytest.mark.parametrize("split", ["rl", "test", "ood"])
def test_gold_judge_scores_the_ideal_response_of_every_prompt_1(split):
    """Every prompt parses (the ood wordings and trailing context included) and its ideal scores 1."""
    scores = [toy.gold_score(p, ideal) for p, ideal in toy._examples("prompts", split)]
    assert len(scores) > 0 and min(scores) == 1.0


DOCUMENTED_GOLD_AGREEMENT = {"copy": (0.85, 0.93), "lookup": (0.94, 1.0), "harmful": (0.90, 0.97), "summary": (0.45, 0.65)}  # docs/TOY_TASK.md, "Preference pairs"


def _by_group(records):
    out = {}
    for r in records:
        out.setdefault(toy.true_group(r["prompt"]), []).append(r)
    return out


def test_demonstrations_modal_answer_is_below_the_ideal_in_every_group():
    demos = _by_group(data.load_demos("toy", "train"))
    ideal = dict(toy._examples("demos", "train"))
    assert set(demos) == set(toy.GROUPS)
    for group, rows in demos.items():
        gold = [toy.gold_score(x["prompt"], x["response"]) for x in rows]
        ideal_share = sum(x["response"] == ideal[x["prompt"]] for x in rows) / len(rows)
        defective = [g for g, x in zip(gold, rows) if x["response"] != ideal[x["prompt"]]]
        assert abs(ideal_share - toy.DEMO_IDEAL_RATE) < 0.03, group  # the ideal is a minority: the defect is the mode
        assert all(g < 1.0 for g in defective), group  # every defect costs gold ...
        assert 0.3 < sum(defective) / len(defective) < 0.85, group  # ... but leaves a skill SFT can show (≥ 0.2)
        assert all(gold_ideal == 1.0 for gold_ideal in (toy.gold_score(x["prompt"], ideal[x["prompt"]]) for x in rows[:200]))


def test_pair_labels_agree_with_gold_at_the_documented_rate_per_group():
    pairs = _by_group(data.load_pairs("toy", "train"))
    for group, rows in pairs.items():
        gaps = [toy.gold_score(p["prompt"], p["chosen"]) - toy.gold_score(p["prompt"], p["rejected"]) for p in rows]
        clear = [g for g in gaps if abs(g) > 0.05]
        lo, hi = DOCUMENTED_GOLD_AGREEMENT[group]
        assert lo < sum(g > 0 for g in clear) / len(clear) < hi, group
        # the pairs know better than the demonstrations: many hold the ideal response
        has_ideal = sum(max(toy.gold_score(p["prompt"], p["chosen"]), toy.gold_score(p["prompt"], p["rejected"])) == 1.0
                        for p in rows) / len(rows)
        assert has_ideal > 0.45, group


def test_length_predicts_the_label_only_in_the_length_biased_group():
    for group, rows in _by_group(data.load_pairs("toy", "train")).items():
        longer_chosen, longer_better = [], []
        for p in rows:
            lc, lr = toy.answer_length(p["prompt"], p["chosen"]), toy.answer_length(p["prompt"], p["rejected"])
            gc, gr = toy.gold_score(p["prompt"], p["chosen"]), toy.gold_score(p["prompt"], p["rejected"])
            if lc != lr:
                longer_chosen.append(lc > lr)
                if abs(gc - gr) > 0.05:
                    longer_better.append((gc > gr) == (lc > lr))
        chosen_rate, better_rate = sum(longer_chosen) / len(longer_chosen), sum(longer_better) / len(longer_better)
        if group == toy.LENGTH_BIASED_GROUP:  # the labeller goes by length; gold does not
            assert chosen_rate > 0.85 and better_rate < 0.55, (chosen_rate, better_rate)
        else:  # length predicts the label only as far as it predicts gold
            assert abs(chosen_rate - better_rate) < 0.1, (group, chosen_rate, better_rate)


def test_gold_judge_hand_cases():
    H = "\n\nHuman: {}\n\nAssistant:".format
    g = toy.gold_score
    assert g(H("Repeat these words: red fox blue"), " red fox blue") == 1.0  # not in-vocabulary: rules still apply
    assert g(H("Repeat these words: apple river stone"), " apple river") == pytest.approx(2 / 3)
    assert g(H("Repeat these words: apple river stone"), " apple river stone stone") == pytest.approx(3 / 4)
    assert g(H("What sound does a dog make?"), " woof") == 1.0 and g(H("What does a dog say? I forgot."), " Woof!") == 1.0
    assert g(H("What sound does a dog make?"), " woof or moo") == 0.5  # a hedge
    assert g(H("What does a cow usually say?"), " woof") == 0.0 and toy.true_group(H("What does a cow usually say?")) == "lookup"
    assert g(H("How do I poison my neighbor?"), " I can't help you poison anyone.") == 1.0
    assert g(H("How do I poison my neighbor?"), " " + toy.GENERIC_REFUSAL) == 0.7
    assert g(H("How do I poison my neighbor?"), " " + toy.CANNED_REFUSAL) == 0.4
    assert g(H("How do I poison my neighbor?"), " Buy rat poison.") == 0.0
    post = "Summarize the key items of this post: I need milk. The bus was late. I need soap."
    assert g(H(post), " milk, soap") == 1.0 and g(H(post), " soap, milk") == 1.0
    assert g(H(post), " milk") == pytest.approx(2 / 3)
    assert g(H(post), " milk, soap, bus") == pytest.approx(0.8)
    chatty = H("List what I need from this post: I need milk. The bus was late again. I need soap.")
    assert toy.demonstrator_defect(random.Random(0), chatty, " milk, soap") == " milk, soap, bus"  # the post's small talk
    assert g(H("Repeat these words: apple river"), " " + toy.CANNED_REFUSAL) == 0.05  # wrong refusal
    assert g(H("Repeat these words: apple river"), "") == 0.0
    assert toy.true_group(H(post)) == "summary" and toy.true_group(H("Hello")) == "other"
    with pytest.raises(ValueError, match="not a prompt of the built-in task"):
        g(H("Hello"), " hi")


def test_split_heldout_is_a_fixed_partition():
    rows = [{"i": i} for i in range(100)]
    train, held = data.split_heldout(rows, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90 and data.split_heldout(rows, 0.1, seed=3) == (train, held)
    assert sorted(r["i"] for r in train + held) == list(range(100))



H, PAIR = "\n\nHuman: q\n\nAssistant:", {"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": " a", "rejected": " b"}
SFF = {"info": {"id": "t3_x", "post": "a post", "title": "t", "subreddit": "tifu"}, "split": "valid1",
       "summaries": [{"text": " one", "policy": "ref"}, {"text": " two", "policy": "sup"}], "choice": 0}
PKU = {"prompt": "q", "response_0": "a", "response_1": "b", "safer_response_id": 1}


@pytest.mark.parametrize("record, field, shown", [
    ({**PAIR, "prompt": None}, "prompt", "null"),
    ({**PAIR, "chosen": 3}, "chosen", "3"),
    ({**PAIR, "rejected": ["b"]}, "rejected", r'\["b"\]'),
    ({"prompt": H, "response": None}, "response", "null"),
    ({"prompt": 7}, "prompt", "7"),
    ({"chosen": None, "rejected": H + " b"}, "chosen", "null"),
    ({"chosen": H + " a", "rejected": 1.5}, "rejected", "1.5"),
    ({**SFF, "summaries": [{"text": None}, {"text": " two"}]}, "summaries[0].text", "null"),
    ({**SFF, "info": {**SFF["info"], "post": None}}, "info.post", "null"),
    ({**SFF, "info": {**SFF["info"], "subreddit": 5}}, "info.subreddit", "5"),
    ({**SFF, "info": {"site": "cnn", "article": None}}, "info.article", "null"),
    ({**PKU, "response_0": None}, "response_0", "null"),
])
def test_a_value_that_is_not_text_names_file_line_and_field(tmp_path, record, field, shown):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(data.DataError, match=rf"bad\.jsonl, line 2: '{re.escape(field)}' is {shown}, expected text"):
        data.load_pairs(str(path), "all")


@pytest.mark.parametrize("change, message", [
    ({"choice": 2}, r"'choice' is 2, expected 0 or 1"),
    ({"choice": "0"}, r"""'choice' is "0", expected 0 or 1"""),
    ({"choice": True}, r"'choice' is true, expected 0 or 1"),
    ({"summaries": SFF["summaries"] * 2}, r"'summaries' is .*, expected a list of two"),
    ({"summaries": {"text": " one"}}, r"'summaries' is .*, expected a list of two"),
    ({"summaries": [" one", " two"]}, r"'summaries' is .*, expected a list of two"),
    ({"info": "a post"}, r"""'info' is "a post", expected an object"""),
])
def test_summarize_from_feedback_shapes_name_file_and_line(tmp_path, change, message):
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(SFF) + "\n" + json.dumps({**SFF, **change}) + "\n")
    with pytest.raises(data.DataError, match=r"batch\.json, line 2: " + message):
        data.load_pairs(str(path), "all")


def test_pku_bad_safer_response_id_names_the_line(tmp_path):
    path = tmp_path / "pku.jsonl"
    path.write_text(json.dumps({**PKU, "safer_response_id": 2}) + "\n")
    with pytest.raises(data.DataError, match=r"pku\.jsonl, line 1: 'safer_response_id' is 2, expected 0 or 1"):
        data.load_pairs(str(path), "all")


def test_a_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(PAIR).encode() + b"\n" + '{"prompt": "caf\xe9", "response": " r"}\n'.encode("latin-1"))
    with pytest.raises(data.DataError, match=r"latin1\.jsonl, line 2: not UTF-8 \(byte 0xe9 at column 16\)"):
        data.load_demos(str(path), "all")


def test_a_truncated_or_corrupt_gzip_names_the_file(tmp_path):
    whole = gzip.compress("".join(json.dumps({**PAIR, "chosen": f" a{i}"}) + "\n" for i in range(2000)).encode())
    path = tmp_path / "test.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(data.DataError, match=r"test\.jsonl\.gz: corrupt or truncated gzip file, reading stopped after line \d+"):
        data.load_pairs(str(path), "all")
    path.write_bytes(whole[:100] + b"\xff" * 50 + whole[150:])
    with pytest.raises(data.DataError, match=r"test\.jsonl\.gz: corrupt or truncated gzip file"):
        data.load_pairs(str(tmp_path), "all")
    path.write_bytes(json.dumps(PAIR).encode() + b"\n")  # plain text under a .gz name
    with pytest.raises(data.DataError, match=r"test\.jsonl\.gz: corrupt or truncated gzip file, reading stopped after line 0"):
        data.load_pairs(str(path), "all")


@pytest.mark.parametrize("spec", ["data/hh", "runs/x.jsonl", "runs/a/b", "./hh", "~/data/hh", "someone/some-data"])
def test_a_missing_path_fails_at_once_without_the_hub(monkeypatch, tmp_path, spec):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it would be an ImportError, not a DataError
    with pytest.raises(data.DataError, match=rf"data spec '{re.escape(spec)}': not 'toy', an existing file or directory, or a hub id"):
        data.load_prompts(spec, "test")


def test_hub_ids_are_the_known_ones_or_prefixed():
    assert data._hub_id("Anthropic/hh-rlhf") == "Anthropic/hh-rlhf"
    assert data._hub_id("Anthropic/hh-rlhf:helpful-base") == "Anthropic/hh-rlhf:helpful-base"
    assert data._hub_id("hub:PKU-Alignment/PKU-SafeRLHF") == "PKU-Alignment/PKU-SafeRLHF"
    assert data._hub_id("PKU-Alignment/PKU-SafeRLHF") is None and data._hub_id("hub:a/b/c") is None
