"""Collect the benchmark results (bench/results/*.json) into one markdown page, bench/results/README.md, that the
project README links: serving speed (leaf vs teacher), peers, the teacher stage, teacher backends and training
throughput, each as a table with the command that produced it; any other result file as its top-level figures.

    python bench/report.py [--results bench/results] [--out bench/results/README.md]

Every table is read from the JSON as the script wrote it: rerun a benchmark, then this, to refresh the page.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from statistics import median
from pathlib import Path

from leaf_ray.report import rows_table

RESULTS = Path(__file__).resolve().parent / "results"


def _n(value, digits: int = 1) -> str:
    """A number as the tables show it ("" for a missing one); other values as they are."""
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _one_minute(load) -> float:
    """A load average as scripts record it: os.getloadavg()'s triple, or its first value."""
    return load[0] if isinstance(load, list | tuple) else load


def _load(result: dict) -> list[str]:
    machine = result.get("machine", {})
    before, after = machine.get("loadavg_before"), machine.get("loadavg_after")
    if before is None:
        return []
    return [f"Load average {_one_minute(before):.1f} before, {_one_minute(after):.1f} after."]


def serving(result: dict) -> list[str]:
    speed, limit, paper, setup = result["speed"], result["physical_limit"], result["paper"], result["setup"]
    max_length_rule = setup.get("max_length_rule", "each model's own")
    rows = []
    for key, row in speed.items():
        name, path = key.split("/")
        fraction = limit["fraction_of_limit"][name][path]
        rows.append([name, path, _n(row["docs_per_s"], 2), _n(row["queries_per_s"]),
                     _n(row["query_latency_p50_ms"]), _n(row["query_latency_p95_ms"]),
                     _pct(fraction["docs"]), _pct(fraction["queries"])])
    agreement = {name: min(c["min_cosine"] for c in checks.values()) for name, checks in result["onnx_agreement"].items()}
    flops = {kind: {name: limit[f"flops_per_{kind}"][name] / 1e9 for name in ("teacher", "student")}
             for kind in ("doc", "query")}
    return [
        (f"Student `{result['student']}`, teacher `{result['teacher']}`; {setup['documents']} corpus texts and "
         f"{setup['queries']} queries of {setup['dataset']}, {setup['threads']} threads, {setup['rounds']} "
         f"alternating rounds ({setup.get('query_rounds', setup['rounds'])} for queries); rates: {setup['rates']}; "
         f"max length: {max_length_rule} {setup['max_length']}."), "",
        rows_table(["model", "path", "docs/s", "queries/s", "p50 ms", "p95 ms", "docs: % of CPU limit",
                    "queries: % of CPU limit"], rows),
        (f"**docs_speedup {result['docs_speedup']:.2f}x, queries_speedup {result['queries_speedup']:.2f}x** "
         f"(student / teacher, best path of each) at {result['params']['ratio']:.2f}x fewer parameters; paper: "
         f"{paper['docs_speedup']}x, {paper['queries_speedup']}x at {paper['params_ratio']}x. Batch-1 query latency "
         f"p50 {result['query_latency_p50_speedup']:.2f}x lower."), "",
        (f"Physical limit: {flops['doc']['teacher']:.3g} vs {flops['doc']['student']:.3g} GFLOP per document and "
         f"{flops['query']['teacher']:.3g} vs {flops['query']['student']:.3g} GFLOP per query (teacher vs student: "
         f"{limit['flops_ratio']['docs']:.1f}x and {limit['flops_ratio']['queries']:.1f}x); this machine's matmul "
         f"throughput {limit['matmul_gflops']['teacher']} and {limit['matmul_gflops']['student']} GFLOP/s at each "
         "model's feed-forward shape. ONNX vs PyTorch vectors, min cosine: "
         + ", ".join(f"{n} {c:.6f}" for n, c in agreement.items()) + "."),
        *_fusions(setup.get("onnx_fusions", {})),
        *_breakdown(result.get("query_time_breakdown", {})),
        *_load(result)]


def _breakdown(breakdown: dict[str, dict]) -> list[str]:
    """Where each ONNX path's query time goes: tokenising, and the kernels' largest operator types."""
    if not breakdown:
        return []
    lines = []
    for key, row in breakdown.items():
        ops = ", ".join(f"{op} {_pct(share)}" for op, share in list(row["op_shares"].items())[:4])
        lines.append(f"- {key}: tokenising {_pct(row['tokenize_share'])}, kernels {_pct(row['kernel_share'])} "
                     f"(of which {ops})")
    return ["", "Where the query time goes (one profiled pass over the queries per ONNX path):", *lines, ""]


def _fusions(fusions: dict[str, dict[str, int]]) -> list[str]:
    """How often each of onnxscript's onnxruntime fusion rules applied to each fused graph (the onnx-fused path)."""
    fused = {key: counts for key, counts in fusions.items() if counts}
    if not fused:
        return []
    return ["Fusion rules applied: " + "; ".join(f"{key} " + ", ".join(f"{op} x{n}" for op, n in counts.items())
                                             for key, counts in fused.items()) + "."]


def peers(result: dict) -> list[str]:
    rows = []
    for name, row in result["results"].items():
        speed = result["speed"].get(row.get("speed_key", ""), {})
        asymmetric = row["ndcg_at_10"]["asymmetric"]
        rows.append([name, _n(row.get("wall_s", row.get("distill_s"))), _n(row.get("val_cosine"), 4),
                     _n(row["ndcg_at_10"]["standard"], 4), "n/a" if asymmetric is None else _n(asymmetric, 4),
                     _n(speed.get("docs_per_s")), _n(speed.get("queries_per_s")), row["recipe"]])
    teacher_speed = result["speed"].get("teacher", {})
    rows.append(["teacher", "", "", _n(result["teacher"]["ndcg_at_10"], 4), "", _n(teacher_speed.get("docs_per_s")),
                 _n(teacher_speed.get("queries_per_s")), result["teacher"]["model"]])
    setup, goal, shared = result["setup"], result["goal"], result["shared"]
    wall = result.get("wall_time")
    timing = (f"Wall time, sentence-transformers / leaf-ray: {wall['st_over_leaf_median_per_round']}x over "
              f"{wall['train_rounds']} rounds ({wall['rule']})." if wall else
              "Wall times from one run of each, one after the other.")
    return [
        (f"Config `{result['config']}` {' '.join(result['overrides'])}: {setup['train_rows']} training rows, batch "
         f"{setup['train']['batch_size']}, lr {setup['train']['lr']}; {setup['dataset']}/{setup['split']} "
         f"({setup['documents']} documents, {setup['queries']} queries). The teacher vectors ({shared['teacher_vectors_s']} "
         f"s) and the initial student ({shared['init_student_s']} s) are shared by both trained peers and not in their "
         "times."), "",
        rows_table(["peer", "make (s)", "val cosine", "nDCG@10 standard", "nDCG@10 asymmetric", "docs/s",
                    "queries/s", "recipe"], rows),
        timing,
        (f"Goal (leaf-ray's wall time <= sentence-transformers' with equal or better nDCG@10): wall time "
         f"{'met' if goal['leaf_wall_le_st'] else 'not met'}; nDCG@10 "
         + ", ".join(f"{k} {'met' if v else 'not met'}" for k, v in goal["leaf_ndcg_ge_st"].items()) + ". "
         + result["results"]["model2vec"]["asymmetric_note"] + ".")]


def teacher_stage(result: dict) -> list[str]:
    rows = [[name, _n(median(r["steady_rows_per_s"] for r in runs)),
             _n(median(r["with_startup_rows_per_s"] for r in runs)), _n(median(r["wall_s"] for r in runs))]
            for name, runs in result["runs"].items()]
    return [(f"{result['model']}, {result['texts']} texts ({result['documents']} documents), {result['threads']} "
             f"threads, {result['rounds']} alternating rounds; rates are medians of the rounds."), "",
            rows_table(["path", "steady rows/s", "rows/s with start-up", "wall s"], rows),
            (f"Ray / plain: steady {result['steady_ratio']}x, with start-up {result['with_startup_ratio']}x "
             f"({result.get('ratio_note') or result['mean_ratio_note']}). " + result.get("steady_caveat", ""))]


def teacher_backends(result: dict) -> list[str]:
    rows = [[name, _n(result["median_steady_rows_per_s"][name]), _n(result["steady_vs_transformers"][name], 2),
             _n(result["with_startup_vs_transformers"][name], 2), _n(result["min_cosine_vs_transformers"][name], 6)]
            for name in result["runs"]]
    prepared = ", ".join(f"{k} {v}" for k, v in result["prepared_before_rounds"].items())
    return [(f"{result['model']}, {result['texts']} texts ({result['documents']} documents), max length "
             f"{result['max_length']} for every backend, {result['threads']} threads, median of {result['rounds']} "
             f"alternating rounds" + (f"; before the rounds: {prepared}" if prepared else "") + "."), "",
            rows_table(["backend", "steady rows/s", "steady vs transformers", "with start-up vs transformers",
                        "min cosine"], rows)]


def train_throughput(result: dict) -> list[str]:
    setup, ratios = result["setup"], result.get("vs_plain_loop")
    rows = [[name, _n(row["steady_samples_per_s"]), _n(row["wall_s"]),
             *((_n(ratios["steady_samples_per_s"][name], 3), _n(ratios["with_startup_samples_per_s"][name], 3))
               if ratios else ())] for name, row in result["results"].items()]
    header = ["run", "steady samples/s", "wall s (start-up included)"]
    return [(f"{setup['student']} from {setup['teacher']}, {setup['steps']} steps of {setup['batch_size_per_process']} "
             f"rows per process, {setup['torch_threads_per_process']} torch thread(s) per process, median of "
             f"{setup['rounds']} rounds" + (" in alternating order; ratios are medians of per-round ratios."
                                             if ratios else ", run in one order every round.")), "",
            rows_table(header + (["steady / plain", "with start-up / plain"] if ratios else []), rows), *_load(result)]


def scaling(result: dict) -> list[str]:
    rows = [[p["run"], f"{p['texts']:,}", p["epochs"], f"{p['train_samples']:,}", _n(p["teacher_ndcg_at_10"], 4),
             f"{p['standard_ndcg_at_10']:.4f} ({p['standard_retention']:.1%})",
             f"{p['asymmetric_ndcg_at_10']:.4f} ({p['asymmetric_retention']:.1%})",
             _n(p.get("standard_sts_spearman"), 4), _n(p["val_cosine"], 3)] for p in result["points"]]
    reach = "; ".join(f"{key}: {'not on a rising trend' if v is None else f'{v:,.0f} samples'}"
                      for key, v in result["samples_to_reach"].items())
    return [("Each point a full `jobs/distill.py` run (its command in the JSON); SciFact test nDCG@10 and STS-B "
             "Spearman at full dims, float32; retention = leaf / teacher."), "",
            rows_table(["run", "texts", "epochs", "training samples", "teacher", "standard", "asymmetric",
                        "STS-B leaf", "val cosine"], rows),
            f"Log-linear trend of retention, where it reaches each target: {reach}."]


def scale(result: dict) -> list[str]:
    rows = [[f"{p['rows']:,}", *(_n(p["stage_seconds"][s]) for s in ("mix", "teacher", "train")), _n(p["total_seconds"]),
             _n(p["rows"] / p["total_seconds"]), _n(p["driver_peak_rss_mb"], 0), _n(p["worker_peak_rss_mb"], 0)]
            for p in result["points"]]
    return [result["setup"] + ".", "",
            rows_table(["texts", "mix s", "teacher s", "train s", "total s", "texts/s", "driver peak MiB",
                        "largest worker MiB"], rows),
            (f"Driver peak RSS from the smallest to the largest size: {result['driver_rss_growth']:+.1%} (goal: "
             f"{result['goals']['driver_rss_growth']}); largest run's wall time vs the smallest's scaled by rows: "
             f"{result['time_vs_linear']:.2f}x (goal: {result['goals']['time_vs_linear']}). A driver holding the "
             f"largest run's vectors would add {_n(result['largest_vectors_mb'], 0)} MiB.")]


def job_log(result: dict) -> list[str]:
    rows = [[label, run["commit"], _n(run["minutes"]), run["lines"], _n(run["lines_per_minute"]),
             run["ray_data_progress_lines"], run["repeated_lines"]] for label, run in result["runs"].items()]
    return [rows_table(["checkout", "commit", "minutes", "log lines", "lines/min", "Ray Data progress lines",
                        "repeated lines"], rows)]


def compare_runs(result: dict) -> list[str]:
    a, b = result["labels"]
    rows = [[name, _n(pair["a"], 6), _n(pair["b"], 6), f"{pair['abs_diff']:.2g}"]
            for name, pair in result["differ"].items()]
    missing = [f"only in {label}: {', '.join(names)}" for label, names in ((a, result["only_in_a"]),
                                                                          (b, result["only_in_b"])) if names]
    return [(f"{a} vs {b}: {result['equal_within_atol']} of {result['compared']} figures equal within "
             f"{result['atol']:g}; largest difference {result['max_abs_diff']:.2g} ({result['max_abs_diff_at']})."
             + "".join(f" {line}." for line in missing)),
            *(["", rows_table(["figure", a, b, "difference"], rows)] if rows else [])]


def ablations(result: dict) -> list[str]:
    arms = result["arms"]
    rows = [[row["arm"], ", ".join(f"{k}={v}" for k, v in arms.get(row["arm"], {}).items()) or "baseline",
             row["status"], row["steps"], _n(row["val_cosine"], 4),
             *(_n(row[f"{split}_{mode}_ndcg_at_10"], 4) for split in ("validation", "test")
               for mode in ("standard", "asymmetric")), _n(row["train_seconds"])] for row in result["rows"]]
    teacher, train = result["teacher"], result["baseline_train"]
    return [(f"Teacher {result['teacher_model']}; text mix {result['text_mix']}; baseline train: epochs "
             f"{train['epochs']}, lr {train['lr']}, {train['schedule']} (cycles {train['cycles']}, floor "
             f"{train['min_lr_ratio']}), batch {train['batch_size']}, length groups {train['length_group_batches']}. "
             f"Teacher nDCG@10: validation {_n(teacher['validation_ndcg_at_10'], 4)}, test "
             f"{_n(teacher['test_ndcg_at_10'], 4)}. One trial at a time; train s is the trial's training call."), "",
            rows_table(["arm", "change", "status", "steps", "val cosine", "validation standard",
                        "validation asymmetric", "test standard", "test asymmetric", "train s"], rows),
            f"Chosen on validation (asymmetric nDCG@10): {result['chosen_on_validation']}."]


def scalars(result: dict) -> list[str]:
    rows = [[key, _n(value, 2)] for key, value in result.items() if isinstance(value, int | float | str | bool)]
    return [rows_table(["figure", "value"], rows)]


# benchmark kind -> (section title, command, renderer); a file's kind is its "benchmark" field, else its name.
SECTIONS: dict[str, tuple[str, str, Callable[[dict], list[str]]]] = {
    "serving": ("Serving: leaf vs teacher", "python bench/serving.py <student dir> --out bench/results/serving-<run>.json",
                serving),
    "peers": ("Peers: sentence-transformers and Model2Vec on the same budget", "python bench/peers.py --config <config>",
              peers),
    "teacher_stage_vs_plain_loop": ("Teacher stage: Ray Data vs a plain loop", "python bench/teacher_throughput.py",
                                    teacher_stage),
    "teacher_backends_cpu": ("Teacher backends", "python bench/teacher_backends.py", teacher_backends),
    "train_throughput": ("Training: Ray Train vs a plain loop", "python bench/train_throughput.py", train_throughput),
    "scaling": ("Scaling: quality against training compute", "python bench/scaling.py --config <config>", scaling),
    "scale": ("Scale: the data path from 250k to 2M texts", "python bench/scale.py", scale),
    "job_log": ("A submitted job's log", "python bench/job_log.py --label <checkout> [--working-dir <checkout>]",
                job_log),
    "ablations": ("Ablations: the training recipe one factor at a time",
                  "python bench/ablations.py [--config <config>]", ablations),
    "compare_runs": ("Same results before and after a change",
                     "python bench/compare_runs.py <a>/results.json <b>/results.json --labels <a> <b>", compare_runs),
}
ORDER = list(SECTIONS)


def kind_of(path: Path, result: dict) -> str:
    kind = result.get("benchmark", path.stem)
    return kind if kind in SECTIONS else path.stem


def render(results_dir: Path) -> str:
    """The markdown page for every *.json in `results_dir`, known kinds first in ORDER."""
    found = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path}: not valid JSON ({exc})") from None
        found.append((path, result, kind_of(path, result)))
    found.sort(key=lambda item: (ORDER.index(item[2]) if item[2] in ORDER else len(ORDER), item[0].name))
    lines = ["# Benchmark results", "",
             ("Written by `python bench/report.py` from the JSON files here. Speeds are ratios measured side by side "
             "in one run (alternating, same threads, warm) on a shared 2-core CPU machine; absolute figures move with "
             "the machine's load (recorded where the script records it)."), ""]
    for path, result, kind in found:
        title, command, renderer = SECTIONS.get(kind, (path.stem, None, scalars))
        try:
            body = renderer(result)
        except (KeyError, TypeError) as exc:
            raise SystemExit(f"{path}: missing or malformed field {exc} for a {kind} result") from None
        lines += [f"## {title} (`{path.name}`)", ""]
        if command:
            lines += [f"`{command}`", ""]
        lines += [*body, ""]
        if path.with_suffix(".png").is_file():
            lines += [f"![{path.stem}]({path.with_suffix('.png').name})", ""]
    return "\n".join(lines)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS), help="folder of result JSON files")
    parser.add_argument("--out", help="markdown file (default: README.md in the results folder)")
    args = parser.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out) if args.out else results / "README.md"
    out.write_text(render(results))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
