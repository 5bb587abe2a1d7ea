"""Every dataset the stages read, in one record shape.

    demos    {prompt, response}            (SFT)
    pairs    {prompt, chosen, rejected}    (reward model, DPO)
    prompts  {prompt}                      (PPO rollouts, evaluation)

Every prompt is an Anthropic HH transcript that ends with "\\n\\nAssistant:", and every response
starts right after it (usually with a space), so prompt + response is the full transcript.
`plumbing.chat_prompt` renders a prompt through a tokenizer's chat template.

`spec` names the source:
    toy                                the built-in task (toy.py: no files, no network)
    Anthropic/hh-rlhf[:subset]         the hub dataset (needs network; only when named)
    hub:owner/name[:subset]            any other hub dataset (the prefix keeps a mistyped local path,
                                       e.g. data/hh, off the network: it fails at once instead)
    DIR | FILE.jsonl | FILE.jsonl.gz   local HH-RLHF ({chosen, rejected} transcripts), OpenAI
                                       summarize-from-feedback comparisons ({info, summaries,
                                       choice}), PKU-SafeRLHF ({prompt, response_0, response_1,
                                       safer_response_id}) or a generic JSONL in the shapes above
A real (non-toy) source means all its records: a file whole, every *.jsonl[.gz] / *.json in a
directory and its sub-folders (sorted by path), every split of a hub dataset. `split` is a split
name with an optional integer slice, e.g. "test" or "test[:64]":
    all                        every usable record, in file order
    train / rl / judge / test  carved by `carve_splits`: a prompt's split is set by the sha256 of
                               its text alone, at 45% / 20% / 20% / 15% (SPLIT_FRACTIONS), so no
                               flag (group_by) moves it; all records of a prompt share a split, and
                               a split interleaves the groups, so "test[:200]" samples each.
    valid1 / valid2            summarize-from-feedback rows whose own `split` field says so
OpenAI's protocol holds: a summarize-from-feedback prompt with a valid1/valid2 comparison is carved
into rl / judge / test only (20:20:15), never train; the shared TL;DR batches hold no OpenAI train
rows, so their `train` is empty (a DataError). The built-in task has its own fixed splits (toy.py).

Records carry `group` (str) where the source has one, for group-invariant training (`group_names`):
    toy                  toy.true_group(prompt)
    HH-RLHF              the subset: the file's folder name, or the hub id's subset;
                         group_by="harm" folds them into harmless / helpful (HH_SUBSETS)
    TL;DR, CNN/DM        info.subreddit, info.site
    PKU-SafeRLHF         the alphabetically first harm category flagged in either response, else "safe"
    any record           its own `group` field (a non-empty string), which wins over the above
Bad input (malformed JSON, a bad byte or gzip stream, a wrong type or shape) is a DataError naming
the file and line; unusable records (chosen == rejected, no Assistant turn, an empty response) are
skipped and counted aloud.

The built-in task (`toy`) is toy.py's; its exact rules are in docs/TOY_TASK.md.
"""
import collections
import gzip
import hashlib
import json
import os
import random
import re
import zlib

import toy
from plumbing.runs import DataError  # noqa: F401  (data.DataError: what every reader raises)

HH_SUBSETS = {"harmless-base": "harmless", "helpful-base": "helpful", "helpful-online": "helpful",
              "helpful-rejection-sampled": "helpful"}  # each subset's side under group_by="harm", as the paper reports them
GROUP_BY = (None, "harm")
SPLIT_FRACTIONS = {"train": 0.45, "rl": 0.2, "judge": 0.2, "test": 0.15}  # training (SFT, RM, DPO) takes the most; PPO
#                 prompts, the judge's and the reported test share the rest, each big enough to measure a group on
OPENAI_VALID = ("valid1", "valid2")  # summarize-from-feedback's own held-out splits: never in our train
SPLITS = ("all", *SPLIT_FRACTIONS, *OPENAI_VALID)
HUB_IDS = ("Anthropic/hh-rlhf",)  # named bare; any other needs "hub:", so a mistyped local path never reaches the network


def _show(value):
    """A short JSON rendering of a bad value for an error message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(d, key, where, default=None, name=None):
    """d[key] (or `default` when absent) as text; anything else is a DataError naming `where`."""
    value = d.get(key, default)
    if not isinstance(value, str):
        raise DataError(f"{where}: {name or key!r} is {_show(value)}, expected text")
    return value


def _read_jsonl(path):
    """Yield (line number, record) of a .jsonl / .jsonl.gz / JSON-lines .json file."""
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:  # bytes, so a bad byte is pinned to its line
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}, line {lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(rec).__name__}")
                yield lineno, rec
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file, reading stopped after line {lineno} ({e})") from None


def split_transcript(text):
    """'\\n\\nHuman: ...\\n\\nAssistant: reply' -> (prompt ending in '\\n\\nAssistant:', ' reply')."""
    i = text.rfind("\n\nAssistant:")
    if i < 0:
        return None, None
    i += len("\n\nAssistant:")
    return text[:i], text[i:]


def _comparison(rec, where):
    """An OpenAI summarize-from-feedback comparison -> (pair, group): the subreddit (TL;DR) or site (CNN/DM)."""
    info, summaries, choice = rec["info"], rec["summaries"], rec["choice"]
    if not isinstance(info, dict):
        raise DataError(f"{where}: 'info' is {_show(info)}, expected an object")
    if not isinstance(summaries, list) or len(summaries) != 2 or not all(isinstance(s, dict) for s in summaries):
        raise DataError(f"{where}: 'summaries' is {_show(summaries)}, expected a list of two {{text, policy}} objects")
    if type(choice) is not int or choice not in (0, 1):  # not "0", not True
        raise DataError(f"{where}: 'choice' is {_show(choice)}, expected 0 or 1 (the preferred summary)")
    if "article" in info:
        prompt = toy.human_turn(f"ARTICLE: {_text(info, 'article', where, name='info.article').strip()}\nTL;DR:")
        group = info.get("site")
    else:
        prompt = toy.human_turn(f"SUBREDDIT: r/{_text(info, 'subreddit', where, '', 'info.subreddit')}\n"
                        f"TITLE: {_text(info, 'title', where, '', 'info.title')}\n"
                        f"POST: {_text(info, 'post', where, '', 'info.post').strip()}\nTL;DR:")
        group = info.get("subreddit")
    texts = [" " + _text(s, "text", where, name=f"summaries[{i}].text").strip() for i, s in enumerate(summaries)]
    pair = {"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice],
            "ref": next((t for t, s in zip(texts, summaries) if s.get("policy") == "ref"), None), "_split": rec.get("split")}
    return pair, group if isinstance(group, str) and group else None


def _pku_group(rec, where):
    """The alphabetically first harm category flagged in either response, "safe" if none, None without the flags."""
    flags = [rec[k] for k in ("response_0_harm_category", "response_1_harm_category") if k in rec]
    if not all(isinstance(f, dict) for f in flags):
        raise DataError(f"{where}: a 'response_k_harm_category' is not an object of category -> bool")
    return min((c for f in flags for c, on in f.items() if on is True), default="safe") if flags else None


def _pair_from_record(rec, where, subset=None, group_by=None, need_group=False):
    """Map one record of any supported format to (pair or None, reason skipped). `where` names it;
    `subset` is the HH subset it came from (a folder name or hub data_dir), if any."""
    def need(*keys):
        missing = [k for k in keys if k not in rec]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}; record has {sorted(rec)}")

    group = None
    if "summaries" in rec or "info" in rec:  # OpenAI summarize-from-feedback comparison
        need("info", "summaries", "choice")
        pair, group = _comparison(rec, where)
    elif "response_0" in rec:  # PKU-SafeRLHF: the safer response is chosen
        need("prompt", "response_1", "safer_response_id")
        k = rec["safer_response_id"]
        if str(k) not in ("0", "1"):
            raise DataError(f"{where}: 'safer_response_id' is {_show(k)}, expected 0 or 1")
        k = int(k)
        pair = {"prompt": toy.human_turn(_text(rec, "prompt", where).strip()), "chosen": " " + _text(rec, f"response_{k}", where).strip(),
                "rejected": " " + _text(rec, f"response_{1 - k}", where).strip()}
        group = _pku_group(rec, where)
    elif "prompt" in rec:  # generic, already in our shape: a demo, a prompt alone, or a pair
        if "response" in rec:
            pair = {"prompt": _text(rec, "prompt", where), "chosen": _text(rec, "response", where), "rejected": None}
        elif "chosen" not in rec and "rejected" not in rec:
            pair = {"prompt": _text(rec, "prompt", where), "chosen": None, "rejected": None}
        else:
            need("prompt", "chosen", "rejected")
            pair = {k: _text(rec, k, where) for k in ("prompt", "chosen", "rejected")}
    else:  # HH-RLHF transcripts
        need("chosen", "rejected")
        chosen, rejected = _text(rec, "chosen", where), _text(rec, "rejected", where)
        if chosen == rejected:
            return None, "chosen == rejected"
        prompt, response = split_transcript(chosen)
        if prompt is None:
            return None, "no Assistant turn"
        if not rejected.startswith(prompt):
            return None, "chosen and rejected differ before the last Assistant turn"
        pair = {"prompt": prompt, "chosen": response, "rejected": rejected[len(prompt):]}
        if subset in HH_SUBSETS:
            group = subset
    responses = [r for r in (pair["chosen"], pair["rejected"]) if r is not None]  # a demo has no rejected, a prompt neither
    if any(not r.strip() for r in responses):
        return None, "empty response"
    if len(responses) == 2 and pair["chosen"] == pair["rejected"]:
        return None, "chosen == rejected"
    if "group" in rec:  # an explicit label wins over the one the format implies
        group = rec["group"]
        if not isinstance(group, str) or not group.strip():
            raise DataError(f"{where}: 'group' is {_show(group)}, expected a non-empty label")
    elif group in HH_SUBSETS and group_by == "harm":
        pair["_stratum"] = group  # carve_splits orders by the unfolded subset, whatever group_by says
        group = HH_SUBSETS[group]
    if group:
        pair["group"] = group
    elif need_group:
        raise DataError(f"{where}: no 'group' (needed by --groups known)")
    return pair, None


def read_pairs_file(path, group_by=None, need_group=False):
    """All usable records of one file, in file order, plus a Counter of skipped records by reason.
    An HH record's group is its folder's name when that is an HH subset."""
    pairs, skipped = [], collections.Counter()
    subset = os.path.basename(os.path.dirname(os.path.abspath(path)))
    for lineno, rec in _read_jsonl(path):
        pair, reason = _pair_from_record(rec, f"{path}, line {lineno}", subset, group_by, need_group)
        if reason:
            skipped[reason] += 1
        else:
            pairs.append(pair)
    return pairs, skipped


def _files_in(folder):
    """Every *.jsonl, *.jsonl.gz and *.json in `folder` and its sub-folders (hidden ones aside), sorted."""
    found = []
    for where, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(where, f) for f in files if f.endswith((".jsonl", ".jsonl.gz", ".json")) and not f.startswith(".")]
    if not found:
        raise DataError(f"{folder}: no *.jsonl[.gz] or *.json files in it or its sub-folders")
    return sorted(found)


def _hub_id(spec):
    """The hub id (owner/name[:subset]) that `spec` names, or None: a bare one must be in HUB_IDS."""
    bare = spec[len("hub:"):] if spec.startswith("hub:") else spec
    if not re.fullmatch(r"\w[\w.-]*/[\w.-]+(:[\w.-]+)?", bare):
        return None
    known = bare.partition(":")[0].lower() in {h.lower() for h in HUB_IDS}
    return bare if spec.startswith("hub:") or known else None


def _parse_split(split):
    m = re.fullmatch(r"([\w.-]+)(?:\[(-?\d*):(-?\d*)\])?", split)
    if not m:
        raise DataError(f"split {split!r}: expected a name with an optional slice, e.g. 'test[:64]'")
    name, a, b = m.groups()
    return name, slice(int(a) if a else None, int(b) if b else None)


def _hub_records(hub_id, group_by, need_group):
    import datasets  # only for a named hub id; needs network
    name, _, subset = hub_id.partition(":")
    pairs, skipped = [], collections.Counter()
    for hub_split, ds in datasets.load_dataset(name, data_dir=subset or None).items():
        for i, rec in enumerate(ds):
            pair, reason = _pair_from_record(dict(rec), f"{hub_id} [{hub_split}] row {i}", subset, group_by, need_group)
            skipped.update([reason] if reason else [])
            pairs += [pair] if pair else []
    return pairs, skipped


def carve_splits(records):
    """{train, rl, judge, test: records}, a partition of `records` by prompt (see the module docstring).
    A prompt's split is a function of its text alone: u, the first 64 bits of its sha256 as a number
    in [0, 1), falls between the cumulative SPLIT_FRACTIONS of one split (a prompt with an OpenAI
    valid1/valid2 comparison: of rl / judge / test, renormalized). No flag (group_by), no other
    record and no file it came from moves it, so the splits of any two loads are disjoint. Each
    split interleaves the groups in proportion: its records in the order of their prompt's place
    among the split's prompts of the same source group (the HH subset before any folding)."""
    u, stratum = {}, {}
    for r in records:
        p = r["prompt"]
        if p not in u:  # sha256, not hash(): the same on every process and every run
            u[p] = int(hashlib.sha256(p.encode("utf-8", "surrogatepass")).hexdigest()[:16], 16) / 16 ** 16
            stratum[p] = [r.get("_stratum", r.get("group")), False]
        stratum[p][1] |= r.get("_split") in OPENAI_VALID
    where = {}
    for p, (_, validation) in stratum.items():
        names = [n for n in SPLIT_FRACTIONS if not (validation and n == "train")]
        total, cum = sum(SPLIT_FRACTIONS[n] for n in names), 0.0
        for n in names:
            cum += SPLIT_FRACTIONS[n] / total
            if u[p] < cum or n == names[-1]:
                where[p] = n
                break
    by_slice = collections.defaultdict(list)  # (split, source group) -> its prompts
    for p in u:
        by_slice[where[p], stratum[p][0]].append(p)
    place = {}
    for prompts in by_slice.values():
        prompts.sort(key=u.get)
        place.update({p: (i + 0.5) / len(prompts) for i, p in enumerate(prompts)})
    out = {n: [] for n in SPLIT_FRACTIONS}
    # by place, not by u (which would put each group's lowest u first): any head has every group in its share
    for _, r in sorted(enumerate(records), key=lambda ir: (place[ir[1]["prompt"]], u[ir[1]["prompt"]], ir[0])):
        out[where[r["prompt"]]].append(r)
    return out


def _load_records(spec, split, group_by=None, need_group=False):
    """Records of a file/hub source (pairs, or demos with rejected=None); skips counted aloud."""
    name, cut = _parse_split(split)
    if name not in SPLITS:
        raise DataError(f"{spec}: no split {name!r}; choose from {', '.join(SPLITS)} (each with an optional slice)")
    if group_by not in GROUP_BY:
        raise DataError(f"group_by={group_by!r}: choose from {GROUP_BY}")
    if os.path.exists(spec):
        records, skipped = [], collections.Counter()
        for path in [spec] if os.path.isfile(spec) else _files_in(spec):
            p, s = read_pairs_file(path, group_by, need_group)
            records += p
            skipped += s
    elif _hub_id(spec):
        records, skipped = _hub_records(_hub_id(spec), group_by, need_group)
    else:
        raise DataError(f"data spec {spec!r}: not 'toy', an existing file or directory, or a hub id "
                        f"({', '.join(HUB_IDS)}[:subset], or hub:owner/name[:subset] for another hub dataset)")
    if skipped:
        detail = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
        print(f"data: {spec}: loaded {len(records)} records, skipped {sum(skipped.values())} ({detail})")
    n_valid = sum(r.get("_split") in OPENAI_VALID for r in records)
    if name in SPLIT_FRACTIONS:
        records = carve_splits(records)[name]
    elif name in OPENAI_VALID:
        records = [r for r in records if r.get("_split") == name]
    records = [{k: v for k, v in r.items() if k not in ("_split", "_stratum")} for r in records][cut]
    if not records and name == "train" and n_valid:
        raise DataError(f"{spec} [{split}]: empty: its {n_valid} comparisons are all OpenAI valid1/valid2, which never go to "
                        "train (they are carved into rl / judge / test); read them with 'all', 'valid1' or 'valid2'")
    if not records:
        raise DataError(f"{spec} [{split}]: no usable records")
    return records


def _with_group(record, source):
    return {**record, "group": source["group"]} if "group" in source else record


def _toy(kind, split):
    """A split of the built-in task's demos, pairs or prompts (toy.py), with its slice."""
    name, cut = _parse_split(split)
    if name not in toy.SPLIT_SIZES[kind]:
        raise DataError(f"toy: no {kind} split {name!r}; choose from {sorted(toy.SPLIT_SIZES[kind])}")
    return getattr(toy, kind)(name)[cut]


def load_pairs(spec, split, group_by=None, need_group=False):
    """Preference pairs {prompt, chosen, rejected[, group]}. Unusable records are skipped and counted
    aloud. group_by="harm" folds HH subsets into harmless / helpful; need_group=True makes a record
    without a group a DataError (load_demos and load_prompts take both too)."""
    if spec == "toy":
        return _toy("pairs", split)
    pairs = _load_records(spec, split, group_by, need_group)
    if any(p["rejected"] is None for p in pairs):
        raise DataError(f"{spec} [{split}]: holds demonstrations or prompts, not preference pairs")
    return pairs


def load_demos(spec, split, group_by=None, need_group=False):
    """Demonstrations {prompt, response[, group]}: the chosen response of each pair (for summarize-from-
    feedback, the human reference summary where the comparison has one)."""
    if spec == "toy":
        return _toy("demos", split)
    demos = [_with_group({"prompt": p["prompt"], "response": p.get("ref") or p["chosen"]}, p)
             for p in _load_records(spec, split, group_by, need_group)]
    if any(x["response"] is None for x in demos):
        raise DataError(f"{spec} [{split}]: holds prompts only, not demonstrations")
    return demos


def load_prompts(spec, split, group_by=None, need_group=False):
    """Prompts {prompt[, group]}, each once, in first-seen order (the group of its first record)."""
    if spec == "toy":
        return _toy("prompts", split)
    first = {}
    for r in _load_records(spec, split, group_by, need_group):
        first.setdefault(r["prompt"], r)
    return [_with_group({"prompt": p}, r) for p, r in first.items()]


def group_names(records):
    """The distinct group labels of `records`, sorted: the same label -> index map on every process."""
    return sorted({r["group"] for r in records if r.get("group") is not None})


def split_heldout(records, fraction, seed=0):
    """Carve a fixed held-out part out of one split: (train, heldout), by a seeded permutation."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n = max(1, int(len(records) * fraction))
    held = set(order[:n])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def train_and_heldout(load, spec, split, eval_split=None, seed=0, fraction=0.05, **load_kw):
    """(train, held-out) records for a stage, via `load` (load_demos or load_pairs, given `load_kw`):
    `eval_split` if given; on the built-in task its 'test' split; otherwise a fixed 5% carved from `split`."""
    train = load(spec, split, **load_kw)
    if eval_split:
        return train, load(spec, eval_split, **load_kw)
    if spec == "toy":
        return train, load("toy", "test", **load_kw)
    return split_heldout(train, fraction, seed)
