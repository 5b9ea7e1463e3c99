"""Progress as a person sees it: a bar on a terminal, plain lines at an interval in a log."""

from __future__ import annotations

import io
import re

from leaf_ray.config import RayConfig
from leaf_ray.progress import Progress, interactive


def test_a_log_gets_one_line_per_interval_with_rate_and_eta():
    log = io.StringIO()
    assert not interactive(log)
    with Progress(1000, "teacher m", stream=log, interval_s=0) as progress:
        progress.update(250)
        progress.update(750)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()  # the last update printed; close adds nothing
    assert re.fullmatch(r"teacher m: 250/1,000 texts \(25%\), [\d,.]+ texts/s, ETA \d+m\d\ds, 0m00s elapsed", lines[0])
    assert lines[1].startswith("teacher m: 1,000/1,000 texts (100%)") and "ETA" not in lines[1]


def test_updates_within_the_interval_print_only_the_closing_line():
    log = io.StringIO()
    with Progress(10, "stage", unit="row", stream=log, interval_s=3600) as progress:
        for _ in range(10):
            progress.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stage: 10/10 rows (100%), ")


def test_ray_data_progress_bars_follow_the_config(ray_local):
    from ray.data import DataContext

    from leaf_ray.runtime import init_ray

    context = DataContext.get_current()
    try:
        init_ray(RayConfig(progress_bars=True))
        assert context.enable_progress_bars
        init_ray(RayConfig())  # the default: on a terminal only, and the tests' output is not one
        assert not context.enable_progress_bars
    finally:
        context.enable_progress_bars = False
