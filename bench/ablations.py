"""The training recipe ablated one factor at a time: run an ablation sweep (jobs/sweep.py on a config whose
`sweep.students` are arms over one baseline, with `sweep.test_scores: all`), then tabulate every arm from its
sweep.json: steps, validation cosine on held-out mix rows, SciFact validation (the split arms are chosen on) and
test nDCG@10 in standard and asymmetric mode at the full dimension in float32, and training wall time.

    python bench/ablations.py [--config configs/ablations.yaml] [key.path=value ...]

The sweep resumes like any sweep (rerun the same command), and a finished one is only read again. Writes
bench/results/<sweep name>.json; the chosen arm is the best on validation asymmetric nDCG@10.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from leaf_ray.config import load_config
from leaf_ray.sweep.space import sweep_dir
from leaf_ray.sweep.validation import ALIGNMENT, QUALITY_METRIC, mean_metric

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MODES = {"standard": "student", "asymmetric": "asymmetric"}  # the table's names -> the evaluator's modes


def arm_rows(report: dict) -> list[dict]:
    """One row per trial of a sweep.json, in the config's arm order."""
    rows = []
    for trial in report["trials"]:
        test = report["test"].get(trial["trial_id"], [])
        row = {"arm": trial["params"]["student"], "trial_id": trial["trial_id"], "status": trial["status"],
               "steps": trial.get("train", {}).get("step"), "val_cosine": trial.get("train", {}).get(ALIGNMENT),
               "train_seconds": trial.get("train_seconds")}
        for name, mode in MODES.items():
            row[f"validation_{name}_ndcg_at_10"] = mean_metric(trial.get("records", []), mode, QUALITY_METRIC)
            row[f"test_{name}_ndcg_at_10"] = mean_metric(test, mode, QUALITY_METRIC)
        rows.append(row)
    return rows


def summarize(report: dict, config: dict, command: str) -> dict:
    """The ablation's JSON: every arm, the teacher's references, the arm validation chooses."""
    rows = arm_rows(report)
    tested = next(iter(report["test"].values()), [])
    evaluated = [r for r in rows if r["validation_asymmetric_ndcg_at_10"] is not None]
    chosen = max(evaluated, key=lambda r: r["validation_asymmetric_ndcg_at_10"], default=None)
    return {"benchmark": "ablations", "command": command, "teacher_model": report["meta"].get("teacher"),
            "arms": config["sweep"]["students"], "baseline_train": config["train"],
            "text_mix": report["meta"].get("text_mix"),
            "teacher": {"validation_ndcg_at_10": mean_metric(report["teacher_validation"], "teacher", QUALITY_METRIC),
                        "test_ndcg_at_10": mean_metric(tested, "teacher", QUALITY_METRIC)},
            "chosen_on_validation": chosen and chosen["arm"], "rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ablations.yaml")
    parser.add_argument("--out", default=None, help="default: bench/results/<sweep name>.json")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides for the sweep")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    report_path = sweep_dir(cfg) / "sweep.json"
    sweep_args = ["--config", args.config, *args.overrides]
    if not (sweep_dir(cfg) / "run_complete.json").is_file():  # new or interrupted: run (or continue) the sweep
        subprocess.run([sys.executable, str(REPO / "jobs" / "sweep.py"), *sweep_args], check=True)
    report = json.loads(report_path.read_text())
    result = summarize(report, cfg.model_dump(), shlex.join(["python", "jobs/sweep.py", *sweep_args]))
    out = Path(args.out) if args.out else RESULTS / f"{cfg.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        print(json.dumps(row))
    print(f"chosen on validation: {result['chosen_on_validation']}\nwrote {out}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
