"""A run's output folder: one per run name, resumable while unfinished, never silently overwritten."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

from leaf_ray.config import RunConfig

DONE = "run_complete.json"


class RunFinishedError(RuntimeError):
    """The run name already holds a finished run."""


class RunFolder:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.path = cfg.storage.runs_path() / cfg.name
        self.stage_seconds: dict[str, float] = {}

    def refuse_if_finished(self) -> None:
        """A finished run is kept as it is: rerunning its name must not overwrite its student or results."""
        if (self.path / DONE).is_file():
            raise RunFinishedError(
                f"run {self.cfg.name!r} already finished at {self.path} (see its report.md); pick another name "
                f"(e.g. name={self.cfg.name}-2) or delete that folder to run it again")

    def check_writable(self) -> None:
        """Fail before hours of work, not after, when the output place cannot be written."""
        self.path.mkdir(parents=True, exist_ok=True)
        probe = self.path / ".write-probe"
        try:
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise PermissionError(f"run folder {self.path} is not writable: {exc}") from None

    @contextmanager
    def stage(self, name: str):
        """Time a stage of the job and say when it starts and ends."""
        print(f"[leaf] {name} ...", flush=True)
        started = time.perf_counter()
        yield
        self.stage_seconds[name] = round(time.perf_counter() - started, 1)
        print(f"[leaf] {name} done in {self.stage_seconds[name]:.1f} s", flush=True)

    def mark_finished(self, summary: dict) -> None:
        (self.path / DONE).write_text(json.dumps(summary, indent=2, default=str))
