"""Results of a run as files people and programs read: one JSON, a markdown table, PNG plots.

Everything works on metric records, plain dicts with `dataset, split, task, mode, dims, quantization,
bytes_per_vector, metric, value` (what leaf_ray.evaluate produces), so any job that measures something per
(mode, dims, quantization) can report through here. Extra keys in a record become table columns' row keys.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from leaf_ray.storage import StoragePath, resolve

# Row identity of a record, in table order; everything else but metric/value is also row identity.
ROW_KEYS = ("dataset", "split", "task", "mode", "dims", "quantization", "bytes_per_vector")
MODE_ORDER = ("teacher", "student", "asymmetric")
QUANT_ORDER = ("float32", "int8", "binary")


def _order(values: Sequence, preferred: Sequence) -> list:
    """Known values in their preferred order, then the rest in order of appearance."""
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def _row_keys(records: list[dict]) -> list[str]:
    extra = dict.fromkeys(k for r in records for k in r if k not in (*ROW_KEYS, "metric", "value"))
    return [*ROW_KEYS, *extra]


def pivot(records: list[dict]) -> tuple[list[str], list[str], dict[tuple, dict[str, float]]]:
    """(row keys, metric names, {row: {metric: value}}): one row per record identity, one column per metric,
    rows ordered by dataset, task, mode (teacher first), dims (largest first), quantization."""
    keys = _row_keys(records)
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    rows: dict[tuple, dict[str, float]] = {}
    for r in records:
        rows.setdefault(tuple(r.get(k) for k in keys), {})[r["metric"]] = r["value"]
    modes = _order([r.get("mode") for r in records], MODE_ORDER)
    quants = _order([r.get("quantization") for r in records], QUANT_ORDER)

    def sort_key(row: tuple):
        v = dict(zip(keys, row))
        return (str(v["dataset"]), str(v["split"]), str(v["task"]), modes.index(v["mode"]), -(v["dims"] or 0),
                quants.index(v["quantization"]), tuple(str(v[k]) for k in keys[len(ROW_KEYS):]))

    return keys, metrics, dict(sorted(rows.items(), key=lambda item: sort_key(item[0])))


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(records: list[dict]) -> str:
    """One table per task (retrieval and STS report different metrics), metrics as columns."""
    out = []
    for task in dict.fromkeys(r.get("task") for r in records):
        keys, metrics, rows = pivot([r for r in records if r.get("task") == task])
        shown = [i for i, k in enumerate(keys) if k != "task"]
        header = [keys[i] for i in shown] + metrics
        cells = [[row[i] for i in shown] + [values.get(m) for m in metrics] for row, values in rows.items()]
        out += [f"### {task}", "", rows_table(header, cells)]
    return "\n".join(out)


def _readable(value) -> str:
    """A meta value as a person reads it: floats to 4 significant digits, mappings as `key value` pairs."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} ({_readable(v)})" if isinstance(v, dict) else f"{k} {_readable(v)}"
                         for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(_readable(v) for v in value)
    return str(value)


def full_dims_scores(records: list[dict], metrics: Mapping[str, str] | None = None
                     ) -> list[tuple[str, str, str, str, int, dict[str, float]]]:
    """(dataset, split, task, metric, dims, mode -> value) per (dataset, split, task): one metric at the full
    dims in float32, the task's `metrics[task]` (tasks it does not name are left out) or else its first-reported
    one, by mode in MODE_ORDER."""
    rows = []
    for dataset, split, task in dict.fromkeys((r["dataset"], r["split"], r["task"]) for r in records):
        if metrics is not None and task not in metrics:
            continue
        group = [r for r in records if (r["dataset"], r["split"], r["task"]) == (dataset, split, task)]
        metric, dims = metrics[task] if metrics else group[0]["metric"], max(r["dims"] for r in group)
        by_mode = {r["mode"]: r["value"] for r in group
                   if (r["metric"], r["dims"], r["quantization"]) == (metric, dims, "float32")}
        if by_mode:
            rows.append((dataset, split, task, metric, dims,
                         {m: by_mode[m] for m in _order(list(by_mode), MODE_ORDER)}))
    return rows


def _retained(value: float, teacher: float | None, mode: str) -> str:
    return f"{value:.4f}" + (f" ({value / teacher:.1%})" if teacher and mode != "teacher" else "")


def headline(records: list[dict]) -> list[str]:
    """One line per (dataset, split, task): its first-reported metric at full dims and float32 for every mode,
    each mode also as a share of the teacher's (the paper's "96.1% of the teacher")."""
    return [f"{dataset}/{split} {metric} @{dims}d float32: "
            + " | ".join(f"{mode} {_retained(v, scores.get('teacher'), mode)}" for mode, v in scores.items())
            for dataset, split, _, metric, dims, scores in full_dims_scores(records)]


def summary(records: list[dict], meta: dict) -> list[str]:
    """What a person reads first: the leaf's size and speed against the teacher's, and the quality each mode
    keeps (a table of the headline)."""
    lines = []
    params, speed = meta.get("params") or {}, meta.get("throughput") or {}
    if params.get("total") and params.get("teacher"):
        lines.append(f"- **size**: {params['total']:,} parameters, {params['teacher'] / params['total']:.2f}x fewer "
                     f"than the teacher's {params['teacher']:,}")
    teacher, student = speed.get("teacher") or {}, speed.get("student") or {}
    rates = [(unit, student[key] / teacher[key]) for unit, key in (("documents", "docs_per_s"),
                                                                   ("queries", "queries_per_s"))
             if teacher.get(key) and student.get(key)]
    if rates:
        lines.append("- **speed**: " + ", ".join(f"{ratio:.2f}x the teacher's {unit}/s" for unit, ratio in rates)
                     + " (measured side by side)")
    scores = full_dims_scores(records)
    if scores:
        modes = list(dict.fromkeys(m for *_, by_mode in scores for m in by_mode))
        lines += ["", "| data | metric | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
        lines += [f"| {dataset}/{split} | {metric} @{dims}d | " + " | ".join(
            _retained(by_mode[m], by_mode.get("teacher"), m) if m in by_mode else "" for m in modes) + " |"
            for dataset, split, _, metric, dims, by_mode in scores]
    return lines


def render_markdown(records: list[dict], title: str, meta: dict | None = None, notes: Sequence[str] = (),
                    plots: Sequence[Path] = ()) -> str:
    """The summary first, then the run's details (every meta field, readable), notes, the full table, plots."""
    meta = meta or {}
    lines = [f"# {title}", ""]
    opening = summary(records, meta)
    if opening:
        lines += ["## Summary", "", *opening, "", "## Details", ""]
    lines += [f"- {key}: {_readable(value)}" for key, value in meta.items() if key != "headline"]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    lines += ["", markdown_table(records)]
    lines += [f"![{p.stem}]({p.as_posix()})" for p in plots]
    return "\n".join(lines) + "\n"


def save_png(fig, path: StoragePath) -> StoragePath:
    """Render a matplotlib figure to PNG bytes and write them in one call (local disk or object store)."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(png.getvalue())
    return path


def plot_metric_vs_dims(records: list[dict], metric: str, out_dir: Path | StoragePath) -> list[StoragePath]:
    """Per (dataset, split): one panel per mode, `metric` against dims, one line per quantization, saved as
    PNGs under `out_dir` (a local directory or an object-store location)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = resolve(out_dir, "report folder")
    chosen = [r for r in records if r["metric"] == metric]
    paths = []
    for dataset, split in dict.fromkeys((r["dataset"], r["split"]) for r in chosen):
        group = [r for r in chosen if (r["dataset"], r["split"]) == (dataset, split)]
        modes = _order([r["mode"] for r in group], MODE_ORDER)
        fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.6), sharey=True, squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for quant in _order([r["quantization"] for r in group], QUANT_ORDER):
                points = sorted((r["dims"], r["value"]) for r in group if (r["mode"], r["quantization"]) == (mode, quant))
                if points:
                    ax.plot(*zip(*points), marker="o", label=quant)
            dims = sorted({r["dims"] for r in group})
            ax.set_xscale("log", base=2)
            ax.set_xticks(dims, [str(d) for d in dims])
            ax.minorticks_off()
            ax.set_title(mode)
            ax.set_xlabel("dims")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(metric)
        axes[0][-1].legend(title="quantization")
        fig.suptitle(f"{dataset} ({split})")
        fig.tight_layout()
        paths.append(save_png(fig, out_dir / f"{dataset}_{split}_{metric}.png"))
    return paths


def write_report(out_dir: Path | str | StoragePath, records: list[dict], title: str, meta: dict | None = None,
                 notes: Sequence[str] = (), plot_metrics: Sequence[str] = ("ndcg_at_10",)) -> dict[str, Path | str]:
    """results.json (meta, notes, records), results.md and plots/*.png under `out_dir` (a local directory or
    an object-store location); returns their paths (Paths when local, else URIs)."""
    out_dir = resolve(out_dir, "report folder")
    plots = [p for m in plot_metrics for p in plot_metric_vs_dims(records, m, out_dir / "plots")]
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps({"title": title, "meta": meta or {}, "notes": list(notes), "records": records},
                                    indent=1, default=str))
    md_path = out_dir / "results.md"
    md_path.write_text(render_markdown(records, title, meta, notes, [Path("plots") / p.name for p in plots]))
    return {"json": json_path.native(), "markdown": md_path.native(),
            **{Path(p.name).stem: p.native() for p in plots}}


def rows_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain markdown table (floats to 4 decimals, None as an empty cell), for tables that are not metric
    records (a sweep's trials, a Pareto front)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_pareto(points: Sequence[dict], front: Sequence[int], path: Path | str | StoragePath, quality_label: str,
                speed_label: str, title: str) -> StoragePath:
    """Two panels of sweep points (dicts with quality, speed, bytes_per_vector, label): quality against speed,
    one colour per bytes-per-vector level, and quality against bytes per vector. Points of the Pareto front
    (indices into `points`) are ringed and named. Saved as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({p["bytes_per_vector"] for p in points}, reverse=True)
    colours = {b: plt.get_cmap("viridis")(i / max(len(levels) - 1, 1)) for i, b in enumerate(levels)}
    on_front = set(front)
    fig, (by_speed, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for i, p in enumerate(points):
        style = {"s": 90, "edgecolors": "black", "linewidths": 1.5} if i in on_front else {"s": 28, "alpha": 0.6}
        by_speed.scatter(p["speed"], p["quality"], color=colours[p["bytes_per_vector"]], **style)
        by_bytes.scatter(p["bytes_per_vector"], p["quality"], color=colours[p["bytes_per_vector"]], **style)
        if i in on_front:
            for ax, x in ((by_speed, p["speed"]), (by_bytes, p["bytes_per_vector"])):
                ax.annotate(p["label"], (x, p["quality"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    for level in levels:
        by_speed.scatter([], [], color=colours[level], label=f"{level} B")
    by_speed.legend(title="bytes/vector", fontsize=7)
    by_speed.set_xlabel(speed_label)
    by_speed.set_ylabel(quality_label)
    by_bytes.set_xscale("log", base=2)
    by_bytes.set_xticks(levels, [str(b) for b in levels])
    by_bytes.minorticks_off()
    by_bytes.set_xlabel("bytes per vector")
    for ax in (by_speed, by_bytes):
        ax.grid(alpha=0.3)
        ax.margins(0.12)  # room for the labels
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, resolve(path, "report file"))
