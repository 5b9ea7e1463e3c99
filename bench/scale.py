"""How the data path's cost grows with the number of texts: mix -> teacher -> cache -> one epoch of training.

    python bench/scale.py [--rows 250000 500000 1000000 2000000] [--out bench/results/scale.json] [--work DIR]

The pipeline is measured, not the model: the teacher and the student are tiny BERTs built here, and the texts
are train-text replicated with unique ids and a replica mark (so none is a duplicate). Each size runs in its
own driver process on a fresh local Ray (peak RSS is a per-process high-water mark), one size after the other.
Per size: wall time per stage, rows/s, the driver's peak RSS and the largest Ray worker's. The claims to read
off the JSON: the driver's peak RSS stays flat as the rows grow (it never holds texts or vectors), and wall
time grows linearly. Writes JSON and a PNG beside it, after every size; the points an earlier run saved there
for other sizes are kept, so a sweep too long for one sitting continues with the sizes it has not run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
STAGES = ("mix", "teacher", "train")


def write_texts(source: Path, folder: Path, rows: int, rows_per_file: int) -> list[Path]:
    """`rows` unique texts as parquet files of `rows_per_file` rows: train-text cycled, each replica marked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(source, "rt") as handle:
        base = [json.loads(line) for line in handle]
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for first in range(0, rows, rows_per_file):
        numbers = range(first, min(first + rows_per_file, rows))
        picked = [(n, base[n % len(base)], n // len(base)) for n in numbers]
        table = pa.table({"id": [f"{row['id']}~{copy}" for _, row, copy in picked],
                          "text": [f"{row['text']} #{copy}" if copy else row["text"] for _, row, copy in picked],
                          "kind": [row["kind"] for _, row, _ in picked]})
        files.append(folder / f"texts-{first // rows_per_file:03d}.parquet")
        pq.write_table(table, files[-1])
    return files


class PeakRss(threading.Thread):
    """Samples this process's RSS and each of its Ray worker descendants' every `interval_s`; keeps the peaks."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.interval_s, self.driver_mb, self.worker_mb, self.worker = interval_s, 0.0, 0.0, None
        self.stop = threading.Event()
        self.start()

    def run(self):
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            self.driver_mb = max(self.driver_mb, me.memory_info().rss / 2**20)
            for child in me.children(recursive=True):
                try:
                    name, rss = " ".join(child.cmdline()[:1]), child.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                if name.startswith("ray::") and rss > self.worker_mb:
                    self.worker_mb, self.worker = rss, name
            time.sleep(self.interval_s)


def run_config(work: Path, files: list[Path], teacher_dir: Path):
    from leaf_ray.config import RunConfig

    return RunConfig.model_validate({
        "name": f"scale-{len(files)}",
        "data": {"sources": [{"path": str(f), "name": f.stem} for f in files], "validation_size": 200},
        "teacher": {"model": str(teacher_dir), "max_length": 32, "batch_size": 256, "chunk_rows": 8192,
                    "num_cpus_per_actor": 1, "torch_threads": 1},
        "student": {"kind": "teacher_layers", "layers": [0], "max_length": 32, "projection_init": "random"},
        "train": {"epochs": 1, "batch_size": 256, "lr": 1e-3, "num_workers": 1, "cpus_per_worker": 0.5,
                  "torch_threads": 1, "log_every_steps": 500, "shuffle_buffer_rows": 4096},
        "evaluate": {"datasets": [], "sts": None, "throughput_samples": 0},
        "ray": {"num_cpus": 2},
        "storage": {"cache_root": str(work / "cache"), "runs_root": str(work / "runs")},
    })


def measure_one(work: Path, files: list[Path], teacher_dir: Path) -> dict:
    """One size in this process: the stages' wall times and the peak memory, as a JSON-able point."""
    import ray

    from leaf_ray.data import build_mix
    from leaf_ray.inputs import training_inputs
    from leaf_ray.runtime import init_ray
    from leaf_ray.train import train_student

    import psutil
    import ray.train.torch  # noqa: F401  (imported before the baseline below, as the driver's fixed cost)

    cfg = run_config(work, files, teacher_dir)
    sampler = PeakRss()
    init_ray(cfg.ray)
    ray.data.DataContext.get_current().enable_progress_bars = False
    setup_mb = psutil.Process().memory_info().rss / 2**20  # libraries imported, Ray started: before any data
    seconds, started = {}, time.perf_counter()
    texts, report = build_mix(cfg.data)
    seconds["mix"] = time.perf_counter() - started
    inputs = training_inputs(cfg, texts)
    seconds["teacher"] = time.perf_counter() - started - seconds["mix"]
    trained = train_student(cfg, inputs)
    seconds["train"] = time.perf_counter() - started - seconds["mix"] - seconds["teacher"]
    sampler.stop.set()
    sampler.join()
    rows = sum(report.kept.values())
    driver_mb = max(sampler.driver_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"rows": rows, "driver_peak_rss_mb": round(driver_mb, 1), "driver_setup_rss_mb": round(setup_mb, 1),
            "driver_growth_mb": round(driver_mb - setup_mb, 1), "worker_peak_rss_mb": round(sampler.worker_mb, 1),
            "largest_worker": sampler.worker, "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
            "total_seconds": round(sum(seconds.values()), 2),
            "rows_per_s": {k: round(rows / v, 1) for k, v in seconds.items()},
            "train_rows": inputs.train_rows, "train_steps": trained.steps, "train_samples_per_s": round(trained.samples_per_s, 1),
            "mix_report": report.as_dict()}


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [p["rows"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in STAGES:
        left.plot(rows, [p["stage_seconds"][stage] for p in points], marker="o", label=stage)
    left.plot(rows, [p["total_seconds"] for p in points], marker="o", color="black", label="total")
    left.plot(rows, [points[0]["total_seconds"] * r / rows[0] for r in rows], ls="--", color="grey",
              label="linear in rows")
    left.set(xlabel="texts", ylabel="wall seconds", title="wall time per stage")
    left.legend()
    right.plot(rows, [p["driver_peak_rss_mb"] for p in points], marker="o", label="driver")
    right.plot(rows, [p["worker_peak_rss_mb"] for p in points], marker="o", label="largest Ray worker")
    right.set(xlabel="texts", ylabel="peak RSS (MiB)", title="peak memory", ylim=(0, None))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[250_000, 500_000, 1_000_000, 2_000_000],
                        help="sizes to run, each a multiple of --rows-per-file")
    parser.add_argument("--rows-per-file", type=int, default=250_000, help="rows per input parquet file")
    parser.add_argument("--teacher-hidden", type=int, default=32, help="the tiny teacher's width (its vectors' dim)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child run of one size
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    if args.one:
        work = args.work
        files = sorted((work / "data").glob("texts-*.parquet"))[: args.rows[0] // args.rows_per_file]
        print("POINT " + json.dumps(measure_one(work / f"run-{args.rows[0]}", files, work / "teacher" / "model")))
        return

    from leaf_ray.config import DataConfig
    from tests.conftest import build_tiny_bert

    work = args.work or Path(tempfile.mkdtemp(prefix="leaf-scale-"))
    write_texts(DataConfig().resolve_path("train-text/texts.jsonl.gz"), work / "data", max(args.rows),
                args.rows_per_file)
    build_tiny_bert(work / "teacher", hidden=args.teacher_hidden, layers=1)
    points = earlier_points(args.out, args.rows)
    for rows in args.rows:
        child = subprocess.run([sys.executable, __file__, "--one", "--rows", str(rows), "--work", str(work),
                                "--rows-per-file", str(args.rows_per_file)], capture_output=True, text=True,
                               check=False)
        point = next((json.loads(line[6:]) for line in child.stdout.splitlines() if line.startswith("POINT ")), None)
        if point is None:
            raise SystemExit(f"the {rows}-row run failed:\n{child.stderr[-3000:]}")
        point["requested_rows"] = rows
        points = sorted([*points, point], key=lambda p: p["rows"])
        print(json.dumps({k: point[k] for k in ("rows", "driver_peak_rss_mb", "worker_peak_rss_mb",
                                                "stage_seconds", "total_seconds")}), flush=True)
        summary = summarise(points, args)  # saved after every size: a long run stopped early keeps its points
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
        plot(points, args.out.with_suffix(".png"))
    print(f"driver RSS growth {summary['driver_rss_growth']:+.1%}, time vs linear {summary['time_vs_linear']:.2f}x; "
          f"wrote {args.out} and {args.out.with_suffix('.png')}")


def earlier_points(out: Path, rows: list[int]) -> list[dict]:
    """The points an earlier run saved in `out` for sizes not rerun now: a sweep of sizes too long for one sitting
    continues where it stopped (`--rows 1000000 2000000` after `--rows 250000 500000`)."""
    if not out.is_file():
        return []
    return [p for p in json.loads(out.read_text()).get("points", []) if p.get("requested_rows", p["rows"]) not in rows]


def summarise(points: list[dict], args) -> dict:
    first, last = points[0], points[-1]
    return {
        "benchmark": "scale", "points": points,
        "driver_rss_growth": round(last["driver_peak_rss_mb"] / first["driver_peak_rss_mb"] - 1, 4),
        "time_vs_linear": round(last["total_seconds"] / (first["total_seconds"] * last["rows"] / first["rows"]), 4),
        "goals": {"driver_rss_growth": "< 0.10 from the smallest to the largest size, and under 1536 MiB",
                  "time_vs_linear": "<= 1.2 (largest run's wall time / the smallest's scaled by rows)"},
        # what a driver holding the largest run's vectors would add to its RSS
        "largest_vectors_mb": round(last["rows"] * args.teacher_hidden * 4 / 2**20, 1),
        "load_avg_after": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": f"tiny BERT teacher (hidden {args.teacher_hidden}, 1 layer, max_length 32, batch 256, 1 actor) and "
                 "its 1-layer student; one epoch, batch 256, 1 worker of 0.5 CPU; local Ray with 2 CPUs; one size "
                 "at a time",
    }

if __name__ == "__main__":
    main()
