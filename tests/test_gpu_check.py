"""bench/gpu_check.py --tiny runs with Ray unimportable and writes well-formed JSON: finite positive rates,
cosines near 1, and an estimate block that follows from the JSON's own measured rates (timings not checked)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]  # a whole benchmark script, in a subprocess

# Runs the script as __main__ with `import ray` made to fail, so any Ray import on the way breaks the run.
NO_RAY = ("import runpy, sys; sys.modules['ray'] = None; sys.argv = ['bench/gpu_check.py', *sys.argv[1:]]; "
          "runpy.run_path('bench/gpu_check.py', run_name='__main__')")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-c", NO_RAY, "--tiny", "--out", str(out)], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=280, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "paper recipe at these rates" in proc.stdout
    return json.loads(out.read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def seconds_at(length: float, measured: dict[int, float]) -> float:
    """The estimate's rule, restated: linear through (0, 0) and the measured points, per-token past the last."""
    points = [(0, 0.0), *sorted(measured.items())]
    if length >= points[-1][0]:
        return points[-1][1] * length / points[-1][0]
    (x0, y0), (x1, y1) = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= length <= b[0])
    return y0 + (y1 - y0) * (length - x0) / (x1 - x0)



def test_runs_without_ray(report):
    assert report["ray_imported"] is False
    assert report["mode"] == "tiny"
    assert report["device"]["torch"] and report["device"]["name"]


def test_figures_are_positive_and_finite(report):
    rows = report["teacher_throughput"]["rows"] + report["student_training"]["rows"]
    assert len(report["teacher_throughput"]["rows"]) >= 4 and len(report["student_training"]["rows"]) == 4
    for row in rows:
        rate = row.get("texts_per_s", row.get("samples_per_s"))
        assert positive(rate) and positive(row["tokens_per_s"]) and positive(row["seconds"]), row
        assert row["steps"] >= 1
        assert row["peak_memory_bytes"] is None or positive(row["peak_memory_bytes"])
    assert all(math.isfinite(row["last_loss"]) for row in report["student_training"]["rows"])


def test_cosines_near_one(report):
    for dtype in ("float32", "float16", "bfloat16"):
        for key in ("min_cosine", "mean_cosine"):
            assert 0.9 <= report["precision"][dtype][key] <= 1.0000001, (dtype, key)
    assert report["precision"]["float32"]["min_cosine"] >= 0.9999


def test_estimate_follows_from_measured_rates(report):
    est, paper = report["estimate"], report["estimate"]["assumptions"]["paper"]
    tokens = est["assumptions"]["tokens"]
    best = report["teacher_throughput"]["best"]
    teacher = {int(length): 1 / row["texts_per_s"] for length, row in best.items()}
    hours = (paper["documents"] * seconds_at(tokens["document"], teacher)
             + paper["queries"] * seconds_at(tokens["query"], teacher)) / 3600
    assert est["teacher_gpu_hours"] == pytest.approx(hours, rel=1e-9)

    student = {row["length"]: 1 / row["samples_per_s"] for row in report["student_training"]["rows"]
               if row["batch_size"] == paper["batch_size"]}
    samples = (paper["documents"] + paper["queries"]) * paper["epochs"]
    fraction = paper["documents"] / (paper["documents"] + paper["queries"])
    hours = samples * (fraction * seconds_at(tokens["document"], student)
                       + (1 - fraction) * seconds_at(tokens["query"], student)) / 3600
    assert est["training_gpu_hours"] == pytest.approx(hours, rel=1e-9)
    assert est["hours"]["8"]["total"] == pytest.approx((est["teacher_gpu_hours"] + est["training_gpu_hours"]) / 8)
    assert "linear" in est["assumptions"]["scaling"]
