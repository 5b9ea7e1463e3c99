"""The scaling curve: one run config distilled at growing text counts, each point a full jobs/distill.py run, then
retention of the teacher's scores against training samples (texts x epochs) with a log-linear trend and where it
would reach the retention and score targets.

    python bench/scaling.py [--config configs/leaf-ir-cpu.yaml] [--texts 2000 4000 8000 16000] [key.path=value ...]

Point `n` is run `<name>-<n>` with `n` texts of the config's first source at its document share. The points share
one growing teacher cache: a point's mix holds the smaller points' rows (seeded limits nest), and the teacher
stage copies rows another cache of the same teacher already holds. Rerunning the command continues an interrupted
point from its caches and checkpoints and only reads finished ones, so a long curve can be stopped and resumed.
Writes bench/results/<name>.json (a `points` list) and the PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from leaf_ray.config import load_config
from leaf_ray.report import full_dims_scores
from leaf_ray.runs import DONE, RunFolder

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
# The paper's retention of the teacher (leaf-ir on BEIR: standard, asymmetric), the curve's reference lines.
PAPER_RETENTION = {"standard": 0.96, "asymmetric": 0.977}
MODES = {"standard": "student", "asymmetric": "asymmetric"}  # the curve's names -> the evaluator's modes


def point_overrides(cfg, texts: int) -> list[str]:
    """The overrides that make point `texts`: the first source's limits at the config's document share."""
    source = cfg.data.sources[0]
    if source.limit_queries is None or source.limit_documents is None:
        raise SystemExit("data.sources.0 needs limit_queries and limit_documents: the curve keeps their share")
    documents = round(texts * source.limit_documents / (source.limit_queries + source.limit_documents))
    return [f"data.sources.0.limit_queries={texts - documents}", f"data.sources.0.limit_documents={documents}"]


def point_record(results: dict, command: str) -> dict:
    """The curve's fields from a finished run's results.json: SciFact test nDCG@10 and STS-B Spearman at the full
    dimension in float32, per mode. Compute is counted in training samples; stage times are left out (a resumed
    point's are those of its last launch)."""
    meta = results["meta"]
    scores = {dataset: by_mode for dataset, _, _, _, _, by_mode in full_dims_scores(results["records"])}
    scifact, sts = scores["scifact"], scores.get("stsbenchmark", {})
    record = {"run": meta["run"], "command": command, "texts": sum(meta["text_mix"]["kept"].values()),
              "epochs": meta["train"]["epoch"], "train_samples": meta["train"]["samples"],
              "val_cosine": meta["train"].get("val_cosine"),
              "teacher_ndcg_at_10": scifact["teacher"], "teacher_sts_spearman": sts.get("teacher")}
    for name, mode in MODES.items():
        record[f"{name}_ndcg_at_10"] = scifact.get(mode)
        record[f"{name}_sts_spearman"] = sts.get(mode)
    return record


def trend(points: list[dict], key: str) -> dict | None:
    """Least-squares line of `key` against log10(train_samples); None below two points."""
    xs = np.log10([p["train_samples"] for p in points])
    ys = np.array([p[key] for p in points], dtype=float)
    if len(points) < 2 or not np.isfinite(ys).all():
        return None
    slope, intercept = np.polyfit(xs, ys, 1)
    return {"intercept": float(intercept), "slope_per_decade": float(slope)}


def samples_to_reach(fit: dict | None, value: float) -> float | None:
    """Training samples at which a fitted trend reaches `value` (None: no fit, or a trend that does not rise)."""
    if fit is None or fit["slope_per_decade"] <= 0:
        return None
    return float(10 ** ((value - fit["intercept"]) / fit["slope_per_decade"]))


def summarize(points: list[dict], targets: dict, command: str) -> dict:
    """The curve's JSON: points, a trend per score as retention of the teacher, and where each target lies on it."""
    for point in points:
        for name in MODES:
            point[f"{name}_retention"] = point[f"{name}_ndcg_at_10"] / point["teacher_ndcg_at_10"]
        if point["teacher_sts_spearman"]:
            point["sts_retention"] = point["standard_sts_spearman"] / point["teacher_sts_spearman"]
    teacher = points[-1]["teacher_ndcg_at_10"]
    fits, reach = {}, {}
    for name in MODES:
        fits[name] = trend(points, f"{name}_retention")
        reach[f"{name}_paper_{PAPER_RETENTION[name]:.1%}"] = samples_to_reach(fits[name], PAPER_RETENTION[name])
        reach[f"{name}_ndcg_{targets[name]}"] = samples_to_reach(fits[name], targets[name] / teacher)
    fits["sts"] = trend([p for p in points if "sts_retention" in p], "sts_retention")
    return {"benchmark": "scaling", "command": command, "targets_ndcg_at_10": targets,
            "paper_retention": PAPER_RETENTION, "points": points, "trend_vs_log10_samples": fits,
            "samples_to_reach": reach}


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve["points"]
    samples = np.array([p["train_samples"] for p in points], dtype=float)
    wanted = [v for v in curve["samples_to_reach"].values() if v and v < samples.max() * 1e4]
    xs = np.geomspace(samples.min() / 1.5, max([samples.max() * 1.5, *wanted]), 50)
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label, colour in (("standard", "SciFact nDCG@10, leaf", "tab:blue"),
                               ("asymmetric", "SciFact nDCG@10, leaf queries + teacher docs", "tab:orange"),
                               ("sts", "STS-B Spearman, leaf", "tab:green")):
        have = [p for p in points if f"{key}_retention" in p]
        ax.plot([p["train_samples"] for p in have], [p[f"{key}_retention"] for p in have], "o", color=colour,
                label=label)
        fit = curve["trend_vs_log10_samples"].get(key)
        if fit:
            ax.plot(xs, fit["intercept"] + fit["slope_per_decade"] * np.log10(xs), "--", color=colour, alpha=0.6)
    for name, retention in PAPER_RETENTION.items():
        ax.axhline(retention, color="grey", lw=0.8, ls=":")
        ax.annotate(f"paper {name} {retention:.1%}", (xs[0], retention), fontsize=7, va="bottom")
    teacher = points[-1]["teacher_ndcg_at_10"]
    for name, colour in (("standard", "tab:blue"), ("asymmetric", "tab:orange")):
        target = curve["targets_ndcg_at_10"][name]
        ax.axhline(target / teacher, color=colour, lw=0.8, ls="-.")
        ax.annotate(f"target {name} nDCG@10 {target}", (xs[-1], target / teacher), fontsize=7, va="bottom", ha="right",
                    color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("training samples (texts x epochs)")
    ax.set_ylabel("retention of the teacher's score")
    ax.set_title(f"Scaling: {points[-1]['run'].rsplit('-', 1)[0]} (SciFact test, STS-B; full dims, float32)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/leaf-ir-cpu.yaml")
    parser.add_argument("--texts", type=int, nargs="+", default=[2000, 4000, 8000, 16000])
    parser.add_argument("--name", default="scaling-replica", help="the curve's name: runs <name>-<texts>, "
                        "bench/results/<name>.json")
    parser.add_argument("--standard-target", type=float, default=0.645, help="SciFact nDCG@10 the leaf should reach")
    parser.add_argument("--asymmetric-target", type=float, default=0.52)
    parser.add_argument("--out", default=None, help="default: bench/results/<name>.json (the PNG beside it)")
    parser.add_argument("--only-finished", action="store_true", help="tabulate finished points, run nothing")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides for every point")
    args = parser.parse_intermixed_args(argv)  # overrides may come between the options
    base = load_config(args.config, args.overrides)
    targets = {"standard": args.standard_target, "asymmetric": args.asymmetric_target}
    command = shlex.join(["python", "bench/scaling.py", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out) if args.out else RESULTS / f"{args.name}.json"
    points, curve = [], None
    for texts in sorted(args.texts):
        overrides = [*args.overrides, f"name={args.name}-{texts}", *point_overrides(base, texts)]
        folder = RunFolder(load_config(args.config, overrides))
        job = ["python", "jobs/distill.py", "--config", args.config, *overrides]
        if not (folder.location / DONE).is_file():
            if args.only_finished:
                continue
            subprocess.run([sys.executable, *job[1:]], check=True, cwd=REPO)
        points.append(point_record(json.loads((folder.location / "results.json").read_text()), shlex.join(job)))
        print(json.dumps({k: points[-1][k] for k in ("run", "train_samples", "standard_ndcg_at_10",
                                                     "asymmetric_ndcg_at_10")}), flush=True)
        curve = summarize(points, targets, command)  # written after every point: a cut-off curve keeps its points
        out.write_text(json.dumps(curve, indent=2) + "\n")
        plot(curve, out.with_suffix(".png"))
    if curve is None:
        raise SystemExit("no finished point yet")
    for key, samples in curve["samples_to_reach"].items():
        print(f"{key}: {'not on a rising trend' if samples is None else f'{samples:,.0f} training samples'}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return curve


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
