"""A run's output folder: one per run name, resumable while unfinished, never silently overwritten.

The folder is `<storage.runs_root>/<name>` (`location`), on a local disk or an object store. `path` is its
local working copy, for what must be a local directory (the exported student that sentence-transformers
writes and evaluation loads): the folder itself when runs_root is local, else a directory under
`storage.local_cache` whose contents are published to the bucket with `publish`.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager

from leaf_ray.config import RunConfig
from leaf_ray.errors import LeafRayError

DONE = "run_complete.json"


class RunFinishedError(LeafRayError, RuntimeError):
    """The run name already holds a finished run."""


class RunFolder:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.location = cfg.storage.runs_location() / cfg.name
        if self.location.is_local:
            self.path = self.location.native()
        else:  # one local copy per (runs_root, name): two buckets' runs of the same name never mix
            digest = hashlib.sha256(self.location.uri.encode()).hexdigest()[:12]
            self.path = cfg.storage.local_cache_path() / "runs" / digest / cfg.name
        self.stage_seconds: dict[str, float] = {}

    def refuse_if_finished(self) -> None:
        """A finished run is kept as it is: rerunning its name must not overwrite its student or results."""
        if (self.location / DONE).is_file():
            raise RunFinishedError(
                f"run {self.cfg.name!r} already finished at {self.location} (see its report.md); pick another "
                f"name (e.g. name={self.cfg.name}-2) or delete that folder to run it again")

    def check_writable(self) -> None:
        """Fail before hours of work, not after, when the run folder or the teacher-cache root cannot be
        written (a read-only disk, a missing bucket, no credentials, an unreachable endpoint); the error
        names the storage field."""
        self.location.check_writable("storage.runs_root")
        self.cfg.storage.cache_location().check_writable("storage.cache_root")
        self.path.mkdir(parents=True, exist_ok=True)

    def publish(self, relative: str) -> None:
        """Copy `<path>/<relative>` (a file or a directory) to the run's location; nothing to do when the
        run folder is local (`path` is the folder itself)."""
        if not self.location.is_local:
            (self.location / relative).upload(self.path / relative)

    def fetch(self, relative: str) -> None:
        """Copy `<location>/<relative>` into the local working copy (no-op when local)."""
        if not self.location.is_local:
            (self.location / relative).download(self.path / relative)

    @contextmanager
    def stage(self, name: str):
        """Time a stage of the job and say when it starts and ends."""
        print(f"[leaf] {name} ...", flush=True)
        started = time.perf_counter()
        yield
        self.stage_seconds[name] = round(time.perf_counter() - started, 1)
        print(f"[leaf] {name} done in {self.stage_seconds[name]:.1f} s", flush=True)

    def mark_finished(self, summary: dict) -> None:
        (self.location / DONE).write_text(json.dumps(summary, indent=2, default=str))
