"""study/reports.py: reports on finished runs, beyond the paper's one table (evaluate.py).

    aggregate RESULTS_JSON…          Win / Tie / Lose and gold per group, mean ± std over seeds
    runs PPO_DIR…                    a table of ppo_gi.py runs from their logs: RL gold (or the judge
                                     RM's score), proxy RM, KL, KL per true group, the smaller group
    study RESULTS_JSON… --out DIR    the study's table over seeds, paired against one row with a
                                     bootstrap interval of Win − Lose ([--versus ROW]), and study.png
    match_kl TARGET CANDIDATE…       the KL-matched control's search: 'match DIR' or 'next ETA CLOSEST'
    plots EVAL_DIR                   an evaluation's plots: reward distributions, gold per group,
                                     training curves, gold_vs_kl.png (the judge's and the proxy's score
                                     against KL over each PPO run: over-optimization, Gao et al. 2022)

    python study/reports.py study runs/pipeline-s{1,2,3,4,5}/study/eval/results.json --out runs/study
"""
import argparse
import json
import math
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import plumbing  # noqa: E402

GOLD_KL_WINDOW = 5  # gold_vs_kl.png: running mean over this many PPO iterations (each a 64-sample rollout)
JUDGE_LOGS = {"gold": "gold", "judge": "judge RM"}  # ppo_gi.py's metrics of the judge's score of its rollouts: prefix -> name


def pyplot():
    """matplotlib.pyplot (Agg backend), or None, said aloud, where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("reports: matplotlib not installed (pip install -r requirements.txt), no plots")
        return None


def save(fig, out, name):
    os.makedirs(out, exist_ok=True)
    fig.savefig(os.path.join(out, name), dpi=120, bbox_inches="tight")
    pyplot().close(fig)


def plot(out, model_dirs, group_rows, rm_scores):
    """PNG plots of one evaluation where matplotlib is installed: reward distributions, per-group gold,
    training curves, the judge's and the proxy's score against KL."""
    plt = pyplot()
    if plt is None:
        return
    if rm_scores:
        fig, ax = plt.subplots(figsize=(7, 4))
        for (name, split), s in rm_scores.items():
            ax.hist(s, bins=30, histtype="step", label=f"{name} ({split})")
        ax.set(xlabel="reward model score", ylabel="responses", title="reward distribution")
        ax.legend(fontsize=6)
        save(fig, out, "reward_distribution.png")
    if group_rows:
        splits, groups = list(dict.fromkeys(r["split"] for r in group_rows)), list(dict.fromkeys(r["group"] for r in group_rows))
        names = list(dict.fromkeys(r["model"] for r in group_rows))
        fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4), squeeze=False)
        for ax, split in zip(axes[0], splits):
            for k, name in enumerate(names):
                means = {r["group"]: r["gold_mean"] for r in group_rows if r["model"] == name and r["split"] == split}
                ax.bar(np.arange(len(groups)) + k / (len(names) + 1), [means.get(g, 0) for g in groups], 1 / (len(names) + 1), label=name)
            ax.set_xticks(np.arange(len(groups)) + (len(names) - 1) / (2 * (len(names) + 1)), groups)
            ax.set(ylabel="mean gold score", title=f"gold per true group ({split})")
        axes[0][0].legend(fontsize=6)
        save(fig, out, "gold_per_group.png")
    plot_gold_vs_kl(out, model_dirs)
    logs = {name: training_log(path) for name, path in model_dirs.items()}
    keys = [k for k in ("train/loss", "objective/scores", "objective/kl", "gold/mean", "judge/mean") if any(k in r for v in logs.values() for r in v)]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for name, rows in logs.items():
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    ax.plot(*zip(*pts), label=name)
            ax.set(title=key, xlabel="step")
            ax.legend(fontsize=6)
        save(fig, out, "training_curves.png")


def training_log(path):
    """The rows of a model directory's metrics.jsonl ([] when it has none, e.g. a hub model)."""
    log = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f]


def judge_prefix(rows):
    """Which judge a ppo_gi.py log scored its rollouts with: 'gold' (gold/*, the built-in task), else
    'judge' (judge/*, the judge RM of ppo_gi.py --judge_reward on real data), else None."""
    return next((j for j in JUDGE_LOGS if any(f"{j}/mean" in r for r in rows)), None)


def gold_vs_kl(path, window=GOLD_KL_WINDOW):
    """The over-optimization curve of one ppo_gi.py run (Gao et al. 2022): per iteration, the KL
    from π^SFT, the judge's score of the sampled rollouts (`scores`: the mean and per group) and the
    proxy RM's (objective/scores), each a running mean over `window` iterations. The judge is gold
    where the run logged gold/*, else the judge RM (judge/*). {} when it logged neither."""
    rows = training_log(path)
    judge = judge_prefix(rows)
    rows = [r for r in rows if judge and "objective/kl" in r and f"{judge}/mean" in r]
    if not rows:
        return {}
    def smooth(xs):  # a running mean over the iterations in the window that logged the key (a batch can miss a group)
        got = [[x for x in xs[max(0, i - window + 1): i + 1] if x is not None] for i in range(len(xs))]
        return [float(np.mean(w)) if w else float("nan") for w in got]
    keys = [f"{judge}/mean"] + sorted({k for r in rows for k in r if k.startswith(f"{judge}/group/")})
    curve = {"judge": judge, "kl": smooth([r["objective/kl"] for r in rows]),
             "scores": {k.rpartition("/")[2] if "/group/" in k else "mean": smooth([r.get(k) for r in rows]) for k in keys}}
    if all("objective/scores" in r for r in rows):
        curve["proxy"] = smooth([r["objective/scores"] for r in rows])
    return curve


def plot_gold_vs_kl(out, model_dirs):
    """gold_vs_kl.png: the judge's score (gold, or the judge RM's) against KL for every PPO run among
    the models, one panel for the mean and one per group; the mean's panel also draws the proxy RM's
    score, dashed on its own axis (Gao et al.'s picture). Written only when some run logged a judge."""
    curves = {name: c for name, path in model_dirs.items() if (c := gold_vs_kl(path))}
    plt = pyplot() if curves else None
    if plt is None:
        return
    judge = " / ".join(dict.fromkeys(JUDGE_LOGS[c["judge"]] for c in curves.values()))
    panels = list(dict.fromkeys(k for c in curves.values() for k in c["scores"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False, layout="constrained")
    for ax, panel in zip(axes[0], panels):
        for k, (name, c) in enumerate(curves.items()):
            if panel in c["scores"]:
                ax.plot(c["kl"], c["scores"][panel], color=f"C{k}", marker=".", markersize=3, label=name)
        ax.set(xlabel="KL(π || π_SFT), per response", title=f"{judge}: {panel}")
    ax = axes[0][0]
    ax.set(ylabel=f"{judge} (sampled rollouts)")
    handles, labels = ax.get_legend_handles_labels()
    if any("proxy" in c for c in curves.values()):
        twin = ax.twinx()
        for k, (name, c) in enumerate(curves.items()):
            if "proxy" in c:
                twin.plot(c["kl"], c["proxy"], color=f"C{k}", ls="--", lw=1, label=f"{name}: proxy RM")
        twin.set(ylabel="proxy RM score (dashed)")
        handles, labels = [a + b for a, b in zip((handles, labels), twin.get_legend_handles_labels())]
    ax.legend(handles, labels, fontsize=6)
    fig.suptitle(f"{judge} vs KL over PPO iterations (running mean of {GOLD_KL_WINDOW})", fontsize=9)
    save(fig, out, "gold_vs_kl.png")


def aggregate(paths):
    """Mean ± std (over the files, e.g. seeds) of every win rate (overall and per group) and of
    every model's gold summary."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    ms = lambda xs: f"{np.mean(xs):.1f} ± {np.std(xs):.1f}"  # noqa: E731
    fmt = lambda w: " / ".join(ms([x[k] for x in w["runs"]]) for k in ("win", "tie", "lose"))  # noqa: E731
    lines = [f"Mean ± population std over {len(runs)} runs ({', '.join(paths)})."]
    for key in ("winrates", "winrates_by_group"):
        cells = {}  # one row per judge, opponent (, group) and split, holding every file's
        for r in runs:
            for w in r.get(key, []):
                cells.setdefault(tuple(w.get(k) for k in ("judge", "opponent", "group", "split")), {**w, "runs": []})["runs"].append(w)
        if cells:
            splits = list(dict.fromkeys(k[3] for k in cells))
            lines += ["", evaluate.markdown_table(list(cells.values()), runs[0]["winrates"][0]["model"], splits, fmt).rstrip("\n")]
    summaries = {}
    for r in runs:
        for g in r["groups"]:
            summaries.setdefault((g["model"], g["split"]), {}).setdefault(g["group"], []).append(g["gold_mean"])
    if summaries:
        groups = list(dict.fromkeys(g for v in summaries.values() for g in v))
        lines += ["", "| model | split | " + " | ".join(groups) + " | mean of groups | best − worst |", "|---|---|" + "---:|" * (len(groups) + 2)]
        for (name, split), by_group in summaries.items():
            per_run = np.array([by_group[g] for g in groups]).T  # [runs, groups]
            lines.append(f"| {name} | {split} | " + " | ".join(f"{np.mean(by_group[g]):.3f}" for g in groups)
                         + f" | {np.mean(per_run.mean(1)):.3f} ± {np.std(per_run.mean(1)):.3f}"
                         + f" | {np.mean(per_run.max(1) - per_run.min(1)):.3f} ± {np.std(per_run.max(1) - per_run.min(1)):.3f} |")
    rewards = {}
    for r in runs:
        for x in r.get("rewards", []):
            rewards.setdefault((x["model"], x["split"]), []).append(x)
    if rewards:
        keys = ("mean", "q05", "q50", "q95", "skewness")
        lines += ["", "| model | split | RM " + " | RM ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
        for (name, split), xs in rewards.items():
            lines.append(f"| {name} | {split} | " + " | ".join(f"{np.mean([x[k] for x in xs]):.2f} ± {np.std([x[k] for x in xs]):.2f}"
                                                              for k in keys) + " |")
    return "\n".join(lines) + "\n"


def run_table(dirs, last=10):
    """One row per ppo_gi.py run, from its metrics.jsonl: the judge's score of the sampled RL rollouts
    (gold, or the judge RM's with ppo_gi.py --judge_reward; judge_prefix) over the first and the last
    `last` iterations and its worst group, the proxy RM's score and the KL over the last iterations,
    the largest KL, the KL on each true group (kl/<group>), the smaller inferred group, and the final
    greedy test gold."""
    rows_out, judges = [], []
    for run in dirs:
        check_ppo_run(run, "runs")
        with open(os.path.join(run, "ppo_args.json")) as f:
            a = json.load(f)
        rows = training_log(run)
        its = [r for r in rows if "objective/kl" in r]
        tail = its[-last:]
        mean = lambda k, rs=tail: float(np.mean([r[k] for r in rs if k in r]))  # noqa: E731  (a small batch can miss a group)
        keys = sorted(set().union(*tail))
        j = judge_prefix(its)
        judges += [JUDGE_LOGS[j]] if j else []
        by_group = {k[len(f"{j}/group/"):]: mean(k) for k in keys if k.startswith(f"{j}/group/")} if j else {}
        worst = min(by_group, key=by_group.get) if by_group else None
        sizes = [mean(k) for k in keys if k.startswith("groups/size_")]
        kl_by_group = ", ".join(f"{k[len('kl/group/'):]} {mean(k):.2f}" for k in keys if k.startswith("kl/group/"))
        greedy = [r["eval/gold_mean"] for r in rows if "eval/gold_mean" in r]
        cells = [os.path.normpath(run), "0" if a["no_gi"] else f"{a['beta_policy']:g}", "" if a["lr"] == 0 else f"{a['kl_coef']:g}",
                 f"{mean(f'{j}/mean', its[:last]):.3f}" if j else "", f"{mean(f'{j}/mean'):.3f}" if j else "",
                 f"{worst} {by_group[worst]:.3f}" if worst else "", f"{mean('objective/scores'):.2f}" if "objective/scores" in tail[-1] else "",
                 f"{mean('objective/kl'):.2f}",
                 f"{max(r['objective/kl'] for r in its):.1f}", kl_by_group, "" if a["no_gi"] else f"{min(sizes):.1f} of {a['rollout_batch']}",
                 f"{greedy[-1]:.3f}" if greedy else ""]
        rows_out.append("| " + " | ".join(cells) + " |")
    judge = " / ".join(dict.fromkeys(judges)) or "gold"
    return "\n".join([f"| run | β_policy | η | RL {judge}, first {last} | RL {judge}, last {last} | worst group ({judge}) | proxy RM score "
                      "| KL | max KL | KL by true group | smaller group | greedy test gold |",
                      "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|", *rows_out])


def check_ppo_run(path, report):
    """`path` must be a finished ppo_gi.py run (ppo_args.json and config.json, written at its end, and
    a log with objective/kl), or the report names it and stops."""
    missing = [f for f in ("ppo_args.json", "config.json", "metrics.jsonl") if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise SystemExit(f"reports.py {report}: {path} is not a finished ppo_gi.py run (no {', '.join(missing)}"
                         + ("; it may still be running, or have failed" if "metrics.jsonl" not in missing else "") + ")")
    if last_mean(path) is None:
        raise SystemExit(f"reports.py {report}: {path}/metrics.jsonl logged no objective/kl: not a ppo_gi.py run's log")


def last_mean(path, last=10, key="objective/kl"):
    """The mean of a ppo_gi.py run's logged `key` over its last `last` iterations, on its RL prompts:
    by default its KL from π^SFT (gold/mean: its RL gold); None for a model that logged none (SFT, DPO)."""
    rows = [r for r in training_log(path) if key in r]
    return float(np.mean([r[key] for r in rows[-last:]])) if rows else None


def match_kl(target, candidates, tolerance=0.1):
    """The KL-matched control: 'match DIR' for the first candidate PPO run whose KL is within
    `tolerance` of the target run's, else 'next ETA CLOSEST' with η interpolated in log η – log KL
    between the candidates nearest the target (KL falls as η grows; one candidate: KL ∝ 1/η)."""
    for path in [target, *candidates]:
        check_ppo_run(path, "match_kl")
    goal = max(last_mean(target), 1e-6)  # (k1 KL can be ≤ 0 at a large η: the log needs it positive)
    runs = []
    for c in candidates:
        with open(os.path.join(c, "ppo_args.json")) as f:
            runs.append((json.load(f)["kl_coef"], max(last_mean(c), 1e-6), os.path.normpath(c)))
    runs.sort(key=lambda r: abs(math.log(r[1] / goal)))
    for eta, kl, path in runs:
        if abs(kl - goal) <= tolerance * goal:
            return f"match {path}"
    above, below = [r for r in runs if r[1] > goal], [r for r in runs if r[1] < goal]
    pair = (above[0], below[0]) if above and below else tuple(runs[:2])
    if len(pair) == 2 and pair[0][0] != pair[1][0]:
        slope = (math.log(pair[0][1]) - math.log(pair[1][1])) / (math.log(pair[0][0]) - math.log(pair[1][0]))
        slope = min(-0.3, max(-3.0, slope))  # keep a noisy pair from sending η far away
    else:
        slope = -1.0
    eta, kl, _ = pair[0]
    # log η_next = log η + (log KL_goal − log KL) / slope
    return f"next {float(f'{eta * math.exp((math.log(goal) - math.log(kl)) / slope):.3g}'):g} {runs[0][2]}"


STUDY_ROW = re.compile(r"GI \((.+)\) β (.+)")  # the study's GI-PPO rows: "GI (grouping) β value"


def study_table(paths, out, reps=2000, versus=None):
    """The study over seeds: per row mean gold, worst true group, best − worst and KL (mean ± std over
    seeds), and its paired Win / Tie / Lose against the model under evaluation (the KL-matched PPO
    w/ KL) by gold, prompt by prompt, with a 95% bootstrap interval of Win − Lose that resamples the
    seeds and the prompts (crossed: every seed answers the same prompts, so one draw of each);
    `versus` names another row to pair against. Writes study.png to `out`: worst-group gold against β_policy."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    names = [evaluate.parse_named(runs[0]["settings"]["model"])[0]] + [evaluate.parse_named(o)[0] for o in runs[0]["settings"]["opponents"]]
    ref = versus or names[0]
    if ref not in names:
        raise SystemExit(f"reports.py study --versus {ref!r}: not a row of the study ({', '.join(names)})")
    dirs = [dict(evaluate.parse_named(s) for s in [r["settings"]["model"]] + r["settings"]["opponents"]) for r in runs]
    splits = runs[0]["settings"]["splits"]
    summary = {(g["model"], g["split"]): [] for g in runs[0]["group_summary"]}
    for r in runs:
        for g in r["group_summary"]:
            summary[g["model"], g["split"]].append(g)
    ms = lambda xs: f"{np.mean(xs):.3f} ± {np.std(xs):.3f}"  # noqa: E731
    lines = [f"Mean ± population std over {len(runs)} seeds; KL and RL gold (of the sampled rollouts) over the last 10 RL iterations; "
             f"paired against {ref} by gold, "
             "Win / Tie / Lose % of (seed, prompt), and Win − Lose with its 95% bootstrap interval (seeds and prompts resampled).", "",
             "| row | KL | RL gold | " + " | ".join(f"{s}: mean gold | {s}: worst group | {s}: best − worst" for s in splits)
             + " | " + " | ".join(f"{s}: W / T / L vs {ref} | {s}: W − L [95%]" for s in splits) + " |",
             "|---|---:|---:|" + "---:|" * (5 * len(splits))]
    rng, stats = np.random.default_rng(0), {}
    for name in names:
        cells = []
        for key in ("objective/kl", "gold/mean"):
            logged = [k for k in (last_mean(d[name], key=key) for d in dirs) if k is not None]
            cells.append(ms(logged) if logged else "")
        for s in splits:
            gs = summary[name, s]
            stats[name, s] = [g["worst_gold"] for g in gs]
            cells += [ms([g["gold_mean"] for g in gs]), ms([g["worst_gold"] for g in gs]), ms([g["gap"] for g in gs])]
        for s in splits:
            diff = [np.sign(np.array(r["items"]["gold"][name][s]) - np.array(r["items"]["gold"][ref][s])) for r in runs]
            every = np.concatenate(diff)
            boot, outcome = [], np.stack(diff)  # [seeds, prompts]: every seed answers the same prompts
            for _ in range(reps):  # seeds and prompts are crossed: one draw of each per replicate
                both = outcome[np.ix_(rng.integers(0, len(diff), len(diff)), rng.integers(0, outcome.shape[1], outcome.shape[1]))]
                boot.append(100 * ((both > 0).mean() - (both < 0).mean()))
            lo, hi = np.percentile(boot, [2.5, 97.5])
            w, t, l_ = (100 * (every > 0).mean(), 100 * (every == 0).mean(), 100 * (every < 0).mean())
            cells += [f"{w:.1f} / {t:.1f} / {l_:.1f}", f"{w - l_:+.1f} [{lo:+.1f}, {hi:+.1f}]"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    plot_study(out, names, stats, splits)
    return "\n".join(lines) + "\n"


def plot_study(out, names, worst, splits):
    """study.png: worst-group gold against β_policy, one line per grouping; the other rows as bands."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.2), squeeze=False)
    for ax, s in zip(axes[0], splits):
        lines = {}
        for name in names:
            m = STUDY_ROW.fullmatch(name)
            if m:
                lines.setdefault(m.group(1), []).append((float(m.group(2)), np.mean(worst[name, s]), np.std(worst[name, s])))
        for grouping, pts in lines.items():
            b, mean, std = zip(*sorted(pts))
            ax.errorbar(b, mean, yerr=std, marker="o", capsize=3, label=f"GI-PPO, groups {grouping}")
        for k, name in enumerate(n for n in names if not STUDY_ROW.fullmatch(n)):
            mean, std = np.mean(worst[name, s]), np.std(worst[name, s])
            ax.axhspan(mean - std, mean + std, alpha=0.08, color=f"C{k + 3}")
            ax.axhline(mean, color=f"C{k + 3}", lw=1, ls="--", label=name)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlim(left=0)
        ax.set(xlabel="β_policy", ylabel="worst true group's mean gold", title=f"worst group ({s}), mean ± std over seeds")
    axes[0][0].legend(fontsize=6)
    save(fig, out, "study.png")


def plots(folder):
    """An evaluation's plots, from its results.json: the models' folders, gold per group, RM scores."""
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    settings = results["settings"]
    model_dirs = dict(evaluate.parse_named(s) for s in [settings["model"]] + settings["opponents"])
    rm = {(name, split): v for name, by_split in results["items"].get("rm", {}).items() for split, v in by_split.items()}
    plot(folder, model_dirs, results["groups"], rm)


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
parser.add_argument("report", choices=["aggregate", "runs", "study", "match_kl", "plots"], help="which report (above)")
parser.add_argument("paths", nargs="+", help="its inputs: results.json files, run folders, or an evaluation folder")
parser.add_argument("--out", default=None, help="study: the folder of study.md and study.png (a new one)")
parser.add_argument("--versus", default=None, help="study: pair every row against this row instead of the model under evaluation")


def main(args):
    if args.report == "study":
        if not args.out:
            parser.error("study needs --out DIR")
        plumbing.check_output(args.out, {}, parser.error, markers=("study.md",))
        table = study_table(args.paths, args.out, versus=args.versus)
        plumbing.write_atomic(os.path.join(args.out, "study.md"), table)
        print(table + f"\nreports: wrote {args.out}/study.md and study.png")
    elif args.report == "match_kl":
        print(match_kl(args.paths[0], args.paths[1:]))
    elif args.report == "plots":
        plots(args.paths[0])
    else:
        print(aggregate(args.paths) if args.report == "aggregate" else run_table(args.paths))


if __name__ == "__main__":
    plumbing.run_main(main, parser)
