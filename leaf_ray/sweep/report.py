"""The sweep's report in its folder: sweep.json (everything), sweep.md (the trials, validation quality per dims
x quantization, the front with its test scores) and pareto.png."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from leaf_ray.config import RunConfig
from leaf_ray.evaluate import bytes_per_vector
from leaf_ray.report import plot_pareto, rows_table
from leaf_ray.storage import resolve
from leaf_ray.sweep.space import FRONT_DIR, sweep_dir
from leaf_ray.sweep.validation import ALIGNMENT, QUALITY_METRIC, TRIAL_MODES, mean_metric


def write_sweep_report(cfg: RunConfig, rows: Sequence[dict], reference: Sequence[dict], speed: Mapping[str, dict],
                       points: Sequence[dict], front: Sequence[int], tested: Mapping[str, list[dict]],
                       meta: dict) -> dict[str, Path]:
    """sweep.json (everything), sweep.md (tables) and pareto.png in the sweep's folder."""
    out, sweep = sweep_dir(cfg), cfg.sweep
    quality_label = f"validation {QUALITY_METRIC} ({sweep.quality_mode})"
    plot = plot_pareto(points, front, out / "pareto.png", quality_label, f"{sweep.speed_metric} (this machine)",
                       f"Sweep {cfg.name}: Pareto front over quality, speed and bytes per vector")
    teacher_params = next((r["param_counts"]["teacher"] for r in rows if r.get("param_counts")), None)
    grid_keys = list(sweep.grid)

    header = ["trial", "student", *grid_keys, "status", "steps", "params (M)", "x smaller", "docs/s", "queries/s",
              "val cosine (mix)", f"val {QUALITY_METRIC} student", f"val {QUALITY_METRIC} asymmetric",
              "cosine to teacher (queries)"]
    table = [["teacher", cfg.teacher.model, *[""] * len(grid_keys), "", "",
              teacher_params / 1e6 if teacher_params else None, 1.0, speed["teacher"]["docs_per_s"],
              speed["teacher"]["queries_per_s"], None, mean_metric(reference, "teacher", QUALITY_METRIC), None, None]]
    for row in rows:
        counts, records, train = row.get("param_counts") or {}, row.get("records", []), row.get("train", {})
        table.append([row["trial_id"], row["params"].get("student"), *[row["params"].get(k) for k in grid_keys],
                      row["status"] + (f": {row['error']}" if row.get("error") else ""), train.get("step"),
                      counts["total"] / 1e6 if counts else None, counts.get("ratio"),
                      speed.get(row["trial_id"], {}).get("docs_per_s"), speed.get(row["trial_id"], {}).get("queries_per_s"),
                      train.get(ALIGNMENT), mean_metric(records, "student", QUALITY_METRIC),
                      mean_metric(records, "asymmetric", QUALITY_METRIC),
                      mean_metric(records, "student", "cosine_to_teacher_queries")])

    variants = list(dict.fromkeys((p["dims"], p["quantization"]) for p in points))
    per_variant = []
    for mode in TRIAL_MODES:
        evaluated = [r for r in rows if r["status"] == "evaluated"]
        per_variant += [f"### {mode}", "", rows_table(
            ["trial", *[f"{d}d {q} ({bytes_per_vector(d, q)} B)" for d, q in variants]],
            [["teacher", *[mean_metric(reference, "teacher", QUALITY_METRIC, d, q) for d, q in variants]]]
            + [[r["trial_id"], *[mean_metric(r["records"], mode, QUALITY_METRIC, d, q) for d, q in variants]]
               for r in evaluated])]

    split = cfg.evaluate.split
    front_rows = [[p["trial_id"], p["label"], p["dims"], p["quantization"], p["bytes_per_vector"], p["quality"],
                   p["speed"], *[mean_metric(tested.get(p["trial_id"], []), mode, QUALITY_METRIC, p["dims"],
                                             p["quantization"]) for mode in TRIAL_MODES]]
                  for p in (points[i] for i in front)]
    lines = [f"# Sweep {cfg.name}: {cfg.teacher.model} -> leaves", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += ["", "## Trials", "", (f"Validation: {', '.join(cfg.evaluate.datasets)} split "
                                    f"`{sweep.validation_split}`; speed measured side by side on this machine "
                                    "after the sweep."), "",
              rows_table(header, table), f"## Validation {QUALITY_METRIC} per dims x quantization (bytes per vector)",
              "", *per_variant,
              f"## Pareto front: {quality_label} vs {sweep.speed_metric} vs bytes per vector", "",
              (f"Test scores ({', '.join(cfg.evaluate.datasets)} split `{split}`) of the Pareto-optimal students "
               f"at the same dims and quantization; full reports under `{FRONT_DIR}/<trial>/`."), "",
              rows_table(["trial", "student", "dims", "quantization", "bytes/vector", "val quality", sweep.speed_metric,
                          f"{split} {QUALITY_METRIC} student", f"{split} {QUALITY_METRIC} asymmetric"], front_rows),
              f"![pareto]({Path(plot.path).name})", ""]
    md_path = out / "sweep.md"
    resolve(md_path).write_text("\n".join(lines))
    json_path = out / "sweep.json"
    resolve(json_path).write_text(json.dumps(
        {"meta": meta, "teacher_validation": list(reference), "throughput": dict(speed), "trials": list(rows),
         "points": [{**p, "pareto": i in set(front)} for i, p in enumerate(points)],
         "test": {trial: records for trial, records in tested.items()}}, indent=1, default=str))
    return {"markdown": md_path, "json": json_path, "plot": Path(plot.path)}
