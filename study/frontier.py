"""study/frontier.py: gold against KL, each method swept over its own KL coefficient (Gao et al. 2022;
Coste et al. 2023): which method stops the hack (RESULTS.md, "Which method stops the hack").

    measure RUN --sft SFT --out FILE   one model: its KL from π^SFT on the test prompts (one sampled
                                       response each, T = 1: Σ_t log π(a_t|s_t) − log π^SFT(a_t|s_t)),
                                       and its greedy gold on test and ood, per true group, with
                                       `summary`'s gold and length (items)
    report MEASURED… --out DIR         the table (frontier.md: mean ± std over seeds per method and
                                       coefficient) and frontier.png (mean and worst-group gold against
                                       KL, a line per method, a band over seeds)
    verdict MEASURED… [--levels …]     at matched KL, each method against PPO w/ KL: Win − Lose by gold
                                       and the worst group's gold, paired prompt by prompt, each method's
                                       sweep interpolated in log KL to the level (as match_kl does), with
                                       95% bootstrap intervals over seeds and prompts

MEASURED are the files `measure` wrote, each in a folder METHOD@COEF under a seed's pipeline-sS
(study/frontier.sh lays them out: PIPELINE/frontier/measured/METHOD@COEF/measured.json).
"""
import argparse
import json
import math
import os
import re
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import evaluate  # noqa: E402
import plumbing  # noqa: E402
import toy  # noqa: E402
from study import reports  # noqa: E402

METHODS = {"ppo_kl": "PPO w/ KL", "gi_ppo": "GI-PPO", "rank_kl": "PPO, rank KL", "rloo": "RLOO", "uwo": "UWO", "wco": "WCO",
           "par": "PAR", "dpo": "DPO", "gr_dpo": "GR-DPO"}  # the baseline first
FOLDER = re.compile(r"(\w+)@([\d.eE+-]+)")


@torch.no_grad()
def measure(run, sft, n_prompts=200, seed=1, max_new_tokens=24, max_len=152):
    """One model's KL from π^SFT (sampled) and greedy gold, as a dict."""
    d = plumbing.Dist(device=torch.device("cpu"))
    tokenizer = plumbing.load_tokenizer(run)
    model, reference = plumbing.load_model(run, tokenizer).eval(), plumbing.load_model(sft, tokenizer).eval()
    test = [x["prompt"] for x in data.load_prompts("toy", f"test[:{n_prompts}]")]
    kl = []
    for i in range(0, len(test), 50):  # KL(π ‖ π^SFT) = E_{y~π}[Σ_t log π(a_t|s_t) − log π^SFT(a_t|s_t)]
        q_ids, q_mask, resp, _, logp = plumbing.generate(model, tokenizer, test[i:i + 50], max_new_tokens=max_new_tokens, temperature=1.0,
                                                         max_prompt_len=max_len - max_new_tokens, seed=seed + i, return_logprobs=True)
        r_mask = plumbing.response_mask(resp, tokenizer.eos_token_id).float()
        ref_logp, _ = plumbing.response_logprobs(reference, torch.cat([q_ids, resp], 1), torch.cat([q_mask, r_mask.long()], 1), q_ids.shape[1])
        kl += ((logp - ref_logp) * r_mask).sum(-1).tolist()
    args = evaluate.parser.parse_args(["--max_new_tokens", str(max_new_tokens), "--max_len", str(max_len), "--seed", str(seed)])
    args.bf16 = False
    prompts = {s: [x["prompt"] for x in data.load_prompts("toy", f"{s}[:{n_prompts}]")] for s in ("test", "ood")}
    texts, _ = evaluate.respond(args, run, prompts, d.device)
    out = {"kl": float(np.mean(kl)), "seconds": train_seconds(run)}
    for s, ps in prompts.items():
        gold = [toy.gold_score(p, t) for p, t in zip(ps, texts[s])]
        rows, summary = evaluate.group_report("m", s, [toy.true_group(p) for p in ps], gold)
        out[s] = {"gold": summary["gold_mean"], "worst": summary["worst_gold"], "worst_group": summary["worst_group"],
                  "groups": {r["group"]: r["gold_mean"] for r in rows}, "items": gold,
                  "summary_items": float(np.mean([toy.answer_length(p, t) for p, t in zip(ps, texts[s]) if toy.true_group(p) == "summary"]))}
    return out


def train_seconds(run):
    """The run's training time: its log's last time_s (model loading and saving aside)."""
    return max((r.get("time_s", 0.0) for r in reports.training_log(run)), default=float("nan"))


def load(paths):
    """{(method, coef, seed): measured} from the files measure wrote (the seed: their folder's pipeline-sS)."""
    out = {}
    for path in paths:
        m, seed = FOLDER.fullmatch(os.path.basename(os.path.dirname(os.path.abspath(path)))), re.search(r"pipeline-s(\d+)", path)
        if not m:
            raise SystemExit(f"frontier.py: {path}: not a measured file (METHOD@COEF/measured.json)")
        key = m.group(1), float(m.group(2)), int(seed.group(1)) if seed else 0
        if key in out:
            raise SystemExit(f"frontier.py: {path}: a second measurement of {key[0]} at {key[1]:g} on seed {key[2]} (its folders "
                             "name the seed: runs/pipeline-sS/…)")
        with open(path) as f:
            out[key] = json.load(f)
    return out


def sweep(measured, method, seed):
    """One method's runs on one seed, ordered by KL: [(kl, measured)]."""
    return sorted(((max(v["kl"], 1e-3), v) for (m, _, s), v in measured.items() if m == method and s == seed), key=lambda p: p[0])


def at_kl(points, level, split="test"):
    """Per-prompt gold and per-group gold at KL `level`, interpolated in log KL between the sweep's two
    runs that bracket it (None outside the sweep: no extrapolation)."""
    for (k0, a), (k1, b) in zip(points, points[1:]):
        if k0 <= level <= k1:
            t = 0.0 if k1 == k0 else (math.log(level) - math.log(k0)) / (math.log(k1) - math.log(k0))
            items = (1 - t) * np.array(a[split]["items"]) + t * np.array(b[split]["items"])
            return items, {g: (1 - t) * a[split]["groups"][g] + t * b[split]["groups"][g] for g in a[split]["groups"]}
    return None


def report(measured, out):
    """frontier.md and frontier.png in `out`."""
    lines = ["Mean ± std over seeds. KL: from π^SFT on 200 test prompts, one sampled response each. Gold: greedy, 200 test "
             "and 200 ood prompts; worst: the lowest true group's mean; summary: its gold and its items per answer. "
             "Time: training seconds per run (one thread).", "",
             "| method | coefficient | seeds | KL | test gold | test worst group | ood gold | ood worst group | summary gold | summary items | time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ms = lambda xs: f"{np.mean(xs):.3f} ± {np.std(xs):.3f}"  # noqa: E731
    for method in METHODS:
        for coef in sorted({c for m, c, _ in measured if m == method}):
            runs = [v for (m, c, _), v in measured.items() if m == method and c == coef]
            lines.append(f"| {METHODS[method]} | {coef:g} | {len(runs)} | {ms([r['kl'] for r in runs])} | {ms([r['test']['gold'] for r in runs])} | "
                         f"{ms([r['test']['worst'] for r in runs])} | {ms([r['ood']['gold'] for r in runs])} | {ms([r['ood']['worst'] for r in runs])} | "
                         f"{ms([r['test']['groups']['summary'] for r in runs])} | {ms([r['test']['summary_items'] for r in runs])} | "
                         f"{np.median([r['seconds'] for r in runs]):.0f} |")
    os.makedirs(out, exist_ok=True)
    plumbing.write_atomic(os.path.join(out, "frontier.md"), "\n".join(lines) + "\n")
    plot(measured, out)
    return "\n".join(lines) + "\n"


def plot(measured, out):
    """frontier.png: mean gold and worst-group gold (test) against KL, a line per method through its
    coefficients (means over seeds), a band of ± one std over seeds."""
    plt = reports.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for k, method in enumerate(METHODS):
        coefs = sorted({c for m, c, _ in measured if m == method})
        if not coefs:
            continue
        pts = []
        for coef in coefs:
            runs = [v for (m, c, _), v in measured.items() if m == method and c == coef]
            pts.append((np.mean([r["kl"] for r in runs]), [r["test"]["gold"] for r in runs], [r["test"]["worst"] for r in runs]))
        pts.sort(key=lambda p: p[0])
        kl = [p[0] for p in pts]
        for ax, i in zip(axes, (1, 2)):
            mean, std = np.array([np.mean(p[i]) for p in pts]), np.array([np.std(p[i]) for p in pts])
            style = dict(color=f"C{k}", ls="--" if method in ("dpo", "gr_dpo") else "-", lw=2.2 if method == "gi_ppo" else 1.3)
            ax.plot(kl, mean, marker="o", markersize=3, label=METHODS[method], **style)
            ax.fill_between(kl, mean - std, mean + std, color=f"C{k}", alpha=0.08)
    for ax, what in zip(axes, ("mean gold", "worst true group's gold")):
        ax.set_xscale("log")
        ax.set(xlabel="KL(π ‖ π^SFT) on the test prompts (sampled)", ylabel=f"{what} (test, greedy)", title=f"{what} against KL")
    axes[0].legend(fontsize=7)
    reports.save(fig, out, "frontier.png")


def verdict(measured, levels, reps=2000):
    """At each KL level, each method against PPO w/ KL, paired: Win − Lose % by gold (prompts × seeds) and
    the difference of the worst group's gold, with 95% bootstrap intervals (seeds and prompts resampled,
    crossed); a method counts where every seed's sweep reaches the level."""
    seeds = sorted({s for _, _, s in measured})
    rng = np.random.default_rng(0)
    lines = [f"Each method against PPO w/ KL at the same KL (interpolated in log KL along each sweep), {len(seeds)} seeds × 200 test "
             "prompts: Win − Lose % by gold with its 95% bootstrap interval; the worst true group's gold, the method's minus PPO "
             "w/ KL's, with its interval (seeds and prompts resampled).", "",
             "| KL | method | mean gold | worst group | Win − Lose [95%] | Δ worst group [95%] |", "|---:|---|---:|---:|---:|---:|"]
    group_of = [toy.true_group(x["prompt"]) for x in data.load_prompts("toy", "test[:200]")]
    names = sorted(set(group_of))
    for level in levels:
        base = [at_kl(sweep(measured, "ppo_kl", s), level) for s in seeds]
        if any(b is None for b in base):
            lines.append(f"| {level:g} | PPO w/ KL | (its sweep does not reach this KL on every seed) | | | |")
            continue
        for method in METHODS:
            got = [at_kl(sweep(measured, method, s), level) for s in seeds]
            if any(g is None for g in got):
                lines.append(f"| {level:g} | {METHODS[method]} | (not reached on every seed) | | | |")
                continue
            mine, theirs = np.stack([g[0] for g in got]), np.stack([b[0] for b in base])  # [seeds, prompts]
            worst = lambda items: np.mean([min(items[s][[i for i, g in enumerate(group_of) if g == n]].mean() for n in names)  # noqa: E731
                                           for s in range(len(items))])
            diff = np.sign(mine - theirs)
            boot_wl, boot_worst = [], []
            for _ in range(reps):
                si, pi = rng.integers(0, len(seeds), len(seeds)), rng.integers(0, mine.shape[1], mine.shape[1])
                sub = diff[np.ix_(si, pi)]
                boot_wl.append(100 * ((sub > 0).mean() - (sub < 0).mean()))
                kept = [group_of[i] for i in pi]
                boot_worst.append(np.mean([min(mine[s, pi][[j for j, g in enumerate(kept) if g == n]].mean() for n in names if n in kept)
                                           - min(theirs[s, pi][[j for j, g in enumerate(kept) if g == n]].mean() for n in names if n in kept)
                                           for s in si]))
            wl = 100 * ((diff > 0).mean() - (diff < 0).mean())
            (a, b), (c, e) = np.percentile(boot_wl, [2.5, 97.5]), np.percentile(boot_worst, [2.5, 97.5])
            lines.append(f"| {level:g} | {METHODS[method]} | {mine.mean():.3f} | {worst(mine):.3f} | {wl:+.1f} [{a:+.1f}, {b:+.1f}] | "
                         f"{worst(mine) - worst(theirs):+.3f} [{c:+.3f}, {e:+.3f}] |")
    return "\n".join(lines) + "\n"


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
parser.add_argument("report", choices=["measure", "report", "verdict"], help="what to do (above)")
parser.add_argument("paths", nargs="+", help="measure: the run's folder; report, verdict: the measured files")
parser.add_argument("--sft", default=None, help="measure: the SFT model the KL is taken from")
parser.add_argument("--out", default=None, help="measure: the file to write (a new one); report: the folder of frontier.md/png")
parser.add_argument("--levels", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="verdict: the KL levels compared at")
parser.add_argument("--seed", type=int, default=1, help="measure: the seed of the sampled responses")


def main(args):
    if args.report == "measure":
        if not (args.sft and args.out):
            parser.error("measure needs --sft and --out")
        if os.path.exists(args.out):
            parser.error(f"--out {args.out} exists: an earlier measurement is not overwritten")
        plumbing.check_model_dir(args.paths[0], "RUN", "lm")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        plumbing.write_atomic(args.out, json.dumps(measure(args.paths[0], args.sft, seed=args.seed)))
    elif args.report == "report":
        if not args.out:
            parser.error("report needs --out DIR")
        print(report(load(args.paths), args.out))
    else:
        print(verdict(load(args.paths), args.levels))


if __name__ == "__main__":
    plumbing.run_main(main, parser)
