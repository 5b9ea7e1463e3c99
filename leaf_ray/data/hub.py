"""Where a data path comes from: the data root, else the local Hugging Face cache, else the Hub.

Data resolves like models do. A path under the data root (`scifact`, `train-text/texts.jsonl.gz`) is read there
when the root holds it; the root is a local mirror of Hugging Face datasets, and `data.hub` names the dataset
each top-level entry mirrors (`scifact: mteb/scifact`), so a machine without the mirror reads the same files from
its Hugging Face cache, or downloads them into that cache when the run allows the Hub (`allow_hub: true` and
HF_HUB_OFFLINE unset). A source may also name a Hub file directly as `hf://datasets/<org>/<name>[@rev]/<path>`.
Either way the readers get a local path, and the error for a path found nowhere lists what was tried.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from leaf_ray.data.sources import DataError, has_pattern
from leaf_ray.models import hub_offline

HF_PREFIX = "hf://datasets/"


@dataclass(frozen=True)
class HubPath:
    """A file or folder inside a Hugging Face dataset repository."""

    repo_id: str
    revision: str | None
    path: str  # inside the repository; "" is its root

    @classmethod
    def parse(cls, uri: str) -> HubPath:
        """`hf://datasets/<org>/<name>[@revision][/<path>]`, HfFileSystem's spelling of a dataset file."""
        parts = uri[len(HF_PREFIX):].rstrip("/").split("/")
        if not uri.startswith(HF_PREFIX) or len(parts) < 2 or not all(parts[:2]):
            raise DataError(f"{uri}: a Hub data path reads hf://datasets/<org>/<name>[@revision]/<path>")
        name, _, revision = parts[1].partition("@")
        return cls(f"{parts[0]}/{name}", revision or None, "/".join(parts[2:]))

    @classmethod
    def mirrored(cls, dataset: str, path: str) -> HubPath:
        """`path` inside `dataset` (`org/name[@revision]`), as `data.hub` names it."""
        return cls.parse(f"{HF_PREFIX}{dataset}/{path}")

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{HF_PREFIX}{self.repo_id}{at}/{self.path}".rstrip("/")


def fetch(where: HubPath, allow_hub: bool, tried: list[str]) -> Path | None:
    """The local copy of `where`: the Hugging Face cache's, else a download into that cache when allowed.
    Appends what it tried to `tried`; None when neither has it."""
    from huggingface_hub import snapshot_download

    patterns = [where.path, f"{where.path}/**"] if where.path else None
    attempts = [("the local Hugging Face cache", True)]
    if allow_hub and not hub_offline():
        attempts.append(("the Hugging Face Hub", False))
    for label, cached_only in attempts:
        try:
            folder = Path(snapshot_download(where.repo_id, repo_type="dataset", revision=where.revision,
                                            allow_patterns=patterns, local_files_only=cached_only))
        except Exception as exc:  # noqa: BLE001 - not cached, unreachable, unknown repo: all mean "not there"
            tried.append(f"{label} ({type(exc).__name__})")
            continue
        local = folder / PurePosixPath(where.path)
        if exists(local):
            return local
        tried.append(f"{label} (snapshot {folder.name[:12]} has no {where.path})")
    if len(attempts) == 1:
        tried.append("the Hugging Face Hub (skipped: " + ("HF_HUB_OFFLINE is set)" if hub_offline()
                                                        else "allow_hub is false)"))
    return None


def exists(path: Path) -> bool:
    """The path exists, or (a glob pattern) matches something."""
    return bool(glob.glob(str(path))) if has_pattern(str(path)) else path.exists()


def resolve_data_path(path: str, root: Path, hub: dict[str, str], allow_hub: bool) -> Path:
    """`path` (absolute, under the data root, or hf://datasets/...) as a local path that exists, or DataError
    naming every place looked in."""
    if path.startswith("hf://"):
        where, tried = HubPath.parse(path), []
    else:
        local = Path(path).expanduser()
        if local.is_absolute():
            return local
        local = root / local
        if exists(local):
            return local
        tried = [f"the data root (no {local})"]
        top, _, rest = PurePosixPath(path).as_posix().partition("/")
        if top not in hub:
            missing = "matches no file" if has_pattern(path) else "does not exist"
            raise DataError(f"{local} {missing} (data root: {root}; set data.root or LEAF_DATA_DIR, or name the "
                            f"Hugging Face dataset '{top}' mirrors in data.hub)")
        where = HubPath.mirrored(hub[top], rest)
    found = fetch(where, allow_hub, tried)
    if found is None:
        raise DataError(f"{path}: not found as {where}; tried " + "; ".join(tried))
    return found
