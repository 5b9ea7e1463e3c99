"""Progress a person can follow both in a terminal and in a job's log: a tqdm bar on a terminal; elsewhere (`ray
job submit`, a file, CI) one plain line per interval with what is done, the rate and the time left, because a log
keeps every redraw of a bar.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0  # between two progress lines in a log


def interactive(stream=None) -> bool:
    """Whether `stream` (default stderr) is a terminal."""
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def bars_shown(setting: bool | None, stream=None) -> bool:
    """A progress-bar setting resolved: True or False as given, None (the default) on a terminal only."""
    return interactive(stream) if setting is None else setting


def quiet_library_bars(stream=None) -> None:
    """Off a terminal (a Ray worker, a job's log), switch off the tqdm bars that transformers and huggingface_hub
    draw while loading and saving weights: a log keeps each as two lines per model, repeated by every worker."""
    if interactive(stream):
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Counts `total` units of a stage: `update(n)` as they finish, `close()` (or the with-block) at the end."""

    def __init__(self, total: int, desc: str, unit: str = "text", stream=None, interval_s: float = LOG_INTERVAL_S):
        self.stream, self.total, self.desc, self.unit = stream or sys.stderr, total, desc, unit
        self.interval_s = interval_s
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream) if interactive(self.stream) else None
        self.done, self.started = 0, time.monotonic()
        self.last_line = self.started
        self.printed = 0  # `done` at the last line

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last_line >= self.interval_s:
            self._line()

    def line(self) -> str:
        """`desc: done/total unit (share), rate unit/s, ETA time` for the work so far."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        left = f", ETA {_duration((self.total - self.done) / rate)}" if rate and self.done < self.total else ""
        return (f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}s{share}, {rate:,.1f} {self.unit}s/s"
                f"{left}, {_duration(elapsed)} elapsed")

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_line, self.printed = time.monotonic(), self.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.printed != self.done or self.done == 0:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
