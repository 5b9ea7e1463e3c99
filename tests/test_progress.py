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


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_library_weight_bars_are_switched_off_in_a_log_and_kept_on_a_terminal():
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    from leaf_ray.progress import quiet_library_bars

    was_hub, was_transformers = are_progress_bars_disabled(), transformers_logging.is_progress_bar_enabled()
    try:
        enable_progress_bars()
        transformers_logging.enable_progress_bar()
        quiet_library_bars(Terminal())
        assert not are_progress_bars_disabled() and transformers_logging.is_progress_bar_enabled()
        quiet_library_bars(io.StringIO())  # a Ray worker's or a job's log
        assert are_progress_bars_disabled() and not transformers_logging.is_progress_bar_enabled()
    finally:
        (disable_progress_bars if was_hub else enable_progress_bars)()
        (transformers_logging.enable_progress_bar if was_transformers else transformers_logging.disable_progress_bar)()
