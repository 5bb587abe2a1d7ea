"""Group labels and the train / rl / judge / test carve of real sources (data.py)."""
import collections
import hashlib
import json
import subprocess
import sys

import pytest

import data
import toy
from conftest import ROOT, needs_shared, shared

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")

TOY_DIGEST_V3 = "3ea306ca82ae7f8774070cfe1d155ea462eed28dc5bf95e851fef8117b9c0fcf"  # every toy split before `group` was added


def _toy_records():
    return ([data.load_demos("toy", s) for s in ("train", "test")] + [data.load_pairs("toy", s) for s in ("train", "test")]
            + [data.load_prompts("toy", s) for s in ("rl", "test", "ood")])


def test_toy_records_carry_their_group_and_are_otherwise_unchanged():
    records = _toy_records()
    assert all(r["group"] == toy.true_group(r["prompt"]) for split in records for r in split)
    assert data.group_names(records[0]) == sorted(toy.GROUPS)
    without = [[{k: v for k, v in r.items() if k != "group"} for r in split] for split in records]
    assert hashlib.sha256(json.dumps(without).encode()).hexdigest() == TOY_DIGEST_V3  # same prompts, responses, order


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@needs_shared
def test_hh_records_carry_their_subset_or_its_side_with_group_by_harm():
    hh = shared("data", "hh-rlhf")
    for subset in HH_SUBSETS:
        assert {p["group"] for p in data.load_pairs(shared("data", "hh-rlhf", subset, "test.jsonl.gz"), "all")} == {subset}
    assert data.group_names(data.load_pairs(hh, "all")) == sorted(HH_SUBSETS)
    folded = data.load_pairs(hh, "all", group_by="harm")
    assert data.group_names(folded) == ["harmless", "helpful"]
    assert sum(p["group"] == "harmless" for p in folded) == sum(p["group"] == "harmless-base" for p in data.load_pairs(hh, "all"))
    assert {p["group"] for p in data.load_prompts(hh, "test[:50]", group_by="harm")} == {"harmless", "helpful"}
    with pytest.raises(data.DataError, match="group_by='subset'"):
        data.load_pairs(hh, "all", group_by="subset")


@needs_shared
def test_summarize_from_feedback_and_pku_groups():
    tldr = data.load_pairs(shared("data", "tldr", "comparisons"), "all")
    raw = [json.loads(line) for name in ("batch13.json", "batch18.json")
           for line in open(shared("data", "tldr", "comparisons", name))]
    assert [p["group"] for p in tldr] == [r["info"]["subreddit"] for r in raw]  # none skipped here
    assert "relationships" in data.group_names(tldr)
    cnn = data.load_pairs(shared("data", "ood", "cnndm-comparisons"), "all")
    assert data.group_names(cnn) == ["cnn", "dailymail"]
    pku_file = shared("data", "ood", "pku-saferlhf", "alpaca-7b-test.head10.jsonl")
    pku = data.load_pairs(pku_file, "all", need_group=True)
    expected = []
    for line in open(pku_file):
        r = json.loads(line)
        flagged = sorted(c for k in (0, 1) for c, on in r[f"response_{k}_harm_category"].items() if on)
        expected.append(flagged[0] if flagged else "safe")
    assert [p["group"] for p in pku] == expected and expected.count("safe") == 4 and "Cybercrime" in expected


def test_generic_group_field_need_group_and_bad_labels(tmp_path):
    pair = {"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": " a", "rejected": " b"}
    path = _write_jsonl(tmp_path / "x.jsonl", [{**pair, "group": "g1"}, {**pair, "prompt": "p2", "group": "g2"}, pair])
    assert [p.get("group") for p in data.load_pairs(path, "all")] == ["g1", "g2", None]
    assert data.group_names(data.load_pairs(path, "all")) == ["g1", "g2"]
    with pytest.raises(data.DataError, match=r"x\.jsonl, line 3: no 'group' \(needed by --groups known\)"):
        data.load_pairs(path, "all", need_group=True)
    with pytest.raises(data.DataError, match=r"line 3: no 'group'"):
        data.load_prompts(path, "all", need_group=True)
    for bad in ("", 3, None):
        path = _write_jsonl(tmp_path / "y.jsonl", [pair, {**pair, "group": bad}])
        with pytest.raises(data.DataError, match=r"y\.jsonl, line 2: 'group' is .*, expected a non-empty label"):
            data.load_demos(path, "all")
    hh = tmp_path / "my-subset"  # an HH file outside an HH subset folder has no group
    hh.mkdir()
    _write_jsonl(hh / "test.jsonl", [{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}])
    assert "group" not in data.load_pairs(str(hh), "all")[0]
    with pytest.raises(data.DataError, match=r"test\.jsonl, line 1: no 'group'"):
        data.load_demos(str(hh), "all", need_group=True)


@needs_shared
def test_hh_test_head_samples_every_subset_in_proportion():
    hh = shared("data", "hh-rlhf")
    overall = collections.Counter(p["group"] for p in data.load_pairs(hh, "all"))
    head = collections.Counter(p["group"] for p in data.load_pairs(hh, "test[:200]"))
    assert set(head) == set(HH_SUBSETS)
    for subset, n in overall.items():
        assert abs(head[subset] / 200 - n / sum(overall.values())) < 0.02, (subset, head)


def _splits(spec, **kw):
    return {s: data.load_pairs(spec, s, **kw) for s in data.SPLIT_FRACTIONS}


@needs_shared
def test_hh_splits_partition_the_records_by_prompt_with_every_subset_in_proportion():
    hh = shared("data", "hh-rlhf")
    every, splits = data.load_pairs(hh, "all"), _splits(hh)
    assert sum(len(x) for x in splits.values()) == len(every)
    key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
    assert sorted(map(key, every)) == sorted(key(p) for x in splits.values() for p in x)
    prompts = {s: {p["prompt"] for p in x} for s, x in splits.items()}
    for a in prompts:
        for b in prompts:
            assert a == b or not prompts[a] & prompts[b], (a, b)
    overall = collections.Counter(p["group"] for p in every)
    for s, x in splits.items():
        assert abs(len(x) / len(every) - data.SPLIT_FRACTIONS[s]) < 0.005, s
        share = collections.Counter(p["group"] for p in x)
        for subset, n in overall.items():
            assert abs(share[subset] / len(x) - n / len(every)) < 0.02, (s, subset)


def _split_digest():
    return ("import data, hashlib, json, sys; print(hashlib.sha256(json.dumps([data.load_pairs(spec, s) for spec in "
            "sys.argv[1:] for s in ('train', 'rl', 'judge', 'test') if not (spec.endswith('comparisons') and s == 'train')]"
            ").encode()).hexdigest())")


@needs_shared
def test_splits_are_deterministic_across_processes():
    specs = [shared("data", "hh-rlhf"), shared("data", "tldr", "comparisons")]
    digests = {subprocess.run([sys.executable, "-c", _split_digest(), *specs], cwd=ROOT, capture_output=True, text=True,
                              env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout.split()[-1] for seed in ("1", "2")}
    assert len(digests) == 1 and len(next(iter(digests))) == 64


@needs_shared
def test_tldr_train_never_holds_an_openai_validation_comparison():
    folder = shared("data", "tldr", "comparisons")  # valid1 and valid2 rows only
    with pytest.raises(data.DataError, match=r"\[train\]: empty: its 1771 comparisons are all OpenAI valid1/valid2"):
        data.load_pairs(folder, "train")
    held = {s: data.load_pairs(folder, s) for s in ("rl", "judge", "test")}
    assert sum(map(len, held.values())) == len(data.load_pairs(folder, "all")) == 1771
    assert len(data.load_pairs(folder, "valid2")) == 832 + 554


def _comparison(post, split, i):
    return {"info": {"id": post, "post": f"post {post}", "title": "t", "subreddit": f"r{int(post) % 3}"}, "split": split,
            "summaries": [{"text": f" {split} {i} a", "policy": "x"}, {"text": f" {split} {i} b", "policy": "y"}],
            "choice": i % 2}


def test_openai_train_rows_alone_reach_our_train(tmp_path):
    rows, i = [], 0
    for post in range(300):  # 150 posts with train rows only, 75 valid1, 45 valid2, 30 with both train and valid2 rows
        kinds = ["train"] if post < 150 else ["valid1"] if post < 225 else ["valid2"] if post < 270 else ["train", "valid2"]
        for kind in kinds:
            rows.append(_comparison(str(post), kind, i))
            i += 1
    path = _write_jsonl(tmp_path / "batch.json", rows)
    splits = _splits(path)
    assert sum(map(len, splits.values())) == len(rows)
    assert splits["train"] and all(" train " in p["chosen"] for p in splits["train"])
    train_posts = {p["prompt"] for p in splits["train"]}
    assert not train_posts & {p["prompt"] for s in data.OPENAI_VALID for p in data.load_pairs(path, s)}
    # of the 150 train-only posts about 45% (one draw per post: 67.5 ± 6.1); the others went to rl / judge / test
    assert abs(len(splits["train"]) - 0.45 * 150) <= 18
    assert len(data.load_pairs(path, "valid1")) == 75 and len(data.load_pairs(path, "valid2")) == 75
    assert all("_split" not in p for x in splits.values() for p in x)


def test_unknown_split_of_a_real_source_lists_the_names(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "response": " r"}])
    with pytest.raises(data.DataError, match=r"no split 'ood'; choose from all, train, rl, judge, test, valid1, valid2"):
        data.load_prompts(path, "ood[:5]")
    with pytest.raises(data.DataError, match="no prompts split 'judge'"):
        data.load_prompts("toy", "judge")


def test_train_and_heldout_carves_five_percent_of_a_real_split(tmp_path):
    rows = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "chosen": " a", "rejected": " b", "group": f"g{i % 2}"} for i in range(400)]
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    train, held = data.train_and_heldout(data.load_pairs, path, "train", seed=1, need_group=True)
    n = len(data.load_pairs(path, "train"))  # about 45% of 400 (one draw per prompt)
    assert len(train) + len(held) == n and abs(n - 180) < 30 and len(held) == int(n * 0.05)
    train, held = data.train_and_heldout(data.load_pairs, path, "train", "test[:10]")
    assert len(held) == 10 and not {p["prompt"] for p in train} & {p["prompt"] for p in held}


def test_a_prompts_split_is_the_same_for_every_group_by_and_every_loader(tmp_path):
    """The four splits are disjoint across every --group_by and every loader (pairs, demos, prompts):
    a prompt's split depends on its text alone. Three HH subsets, two of which fold into `helpful`
    (when the carve was stratified by the folded group, 7 of these 450 prompts changed split)."""
    for subset in ("harmless-base", "helpful-base", "helpful-online"):
        (tmp_path / subset).mkdir()
        _write_jsonl(tmp_path / subset / "test.jsonl", [
            {"chosen": f"\n\nHuman: {subset} question {i}\n\nAssistant: yes", "rejected": f"\n\nHuman: {subset} question {i}\n\nAssistant: no"}
            for i in range(150)])
    where = {}  # prompt -> the splits it was found in, over every group_by and loader
    for group_by in data.GROUP_BY:
        for load in (data.load_pairs, data.load_demos, data.load_prompts):
            for s in data.SPLIT_FRACTIONS:
                for x in load(str(tmp_path), s, group_by=group_by):
                    where.setdefault(x["prompt"], set()).add(s)
    assert len(where) == 450 and all(len(s) == 1 for s in where.values())
    assert {p["group"] for p in data.load_prompts(str(tmp_path), "test", group_by="harm")} == {"harmless", "helpful"}
