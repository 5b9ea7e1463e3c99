"""Do two runs give the same results? Every scored record (dataset, split, mode, dims, quantization, metric), the
validation cosine and loss, the steps trained, the text mix and the parameter counts of two results.json.

    python bench/compare_runs.py runs/a/results.json runs/b/results.json [--labels BEFORE AFTER] [--atol 1e-6]

For checking that a change of code (a refactor, a new dependency) changes no result: the same config run before
and after should agree up to float summation order. Timings and paths are not compared. Prints and saves JSON
(default bench/results/compare-runs.json) with the largest difference and every value that differs by more than
`--atol`; exits 1 when any does, or when one run scored a record the other did not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RECORD_KEY = ("dataset", "split", "task", "mode", "dims", "quantization", "metric")


def scored(results: dict) -> dict[str, float]:
    """The figures a run's quality is read from, by a readable name."""
    figures = {"/".join(str(record.get(k)) for k in RECORD_KEY): record["value"] for record in results["records"]}
    meta = results["meta"]
    for name in ("val_cosine", "val_loss", "step", "samples"):
        figures[f"train/{name}"] = meta["train"][name]
    for name, count in meta.get("params", {}).items():
        figures[f"params/{name}"] = count
    for kind, count in meta.get("text_mix", {}).get("kept", {}).items():
        figures[f"text_mix/kept/{kind}"] = count
    return figures


def compare(a: dict, b: dict, atol: float) -> dict:
    fa, fb = scored(a), scored(b)
    shared = sorted(fa.keys() & fb.keys())
    gaps = {name: abs(fa[name] - fb[name]) for name in shared}
    differ = {name: {"a": fa[name], "b": fb[name], "abs_diff": gap} for name, gap in gaps.items() if gap > atol}
    largest = max(gaps, key=gaps.get) if gaps else None
    return {"compared": len(shared), "atol": atol, "equal_within_atol": len(shared) - len(differ),
            "max_abs_diff": gaps[largest] if largest else 0.0, "max_abs_diff_at": largest, "differ": differ,
            "only_in_a": sorted(fa.keys() - fb.keys()), "only_in_b": sorted(fb.keys() - fa.keys())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="one run's results.json")
    parser.add_argument("b", type=Path, help="the other run's results.json")
    parser.add_argument("--labels", nargs=2, default=("a", "b"), help="what each run is (e.g. two commits)")
    parser.add_argument("--atol", type=float, default=1e-6, help="largest difference counted as equal")
    parser.add_argument("--out", type=Path, default=RESULTS / "compare-runs.json")
    args = parser.parse_args(argv)
    runs = {}
    for side in ("a", "b"):
        path = getattr(args, side)
        if not path.is_file():
            raise SystemExit(f"error: {side}: {path} is not a file (a run folder's results.json)")
        runs[side] = json.loads(path.read_text())
    result = {"benchmark": "compare_runs", "a": str(args.a), "b": str(args.b), "labels": list(args.labels),
              **compare(runs["a"], runs["b"], args.atol)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if result["differ"] or result["only_in_a"] or result["only_in_b"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
