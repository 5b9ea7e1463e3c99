"""Where caches and runs are kept: a local directory or an object store (s3://, gs://), through pyarrow.fs.

A storage root in a config is a local path (relative to the working directory), `file:///absolute/path`,
`s3://bucket/prefix` or `gs://bucket/prefix`. `resolve` turns it into a `StoragePath` (a pyarrow filesystem
and a path in it) that the teacher cache, the run folder, the report and Ray Train share, so one code path
serves a laptop and a bucket.

- Whole-file writes are atomic: on a local disk a temp file is renamed over the target; an object store has
  no rename, but an upload is all-or-nothing (the object appears when it completes), so content is built in
  memory and written in one call. Readers never see half a file.
- Object stores have no append: `append_text` rewrites the object (meant for small logs).
- Credentials come from the environment, as pyarrow reads them: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
  AWS_SESSION_TOKEN / AWS_PROFILE or an instance role for S3, GOOGLE_APPLICATION_CREDENTIALS or the metadata
  server for GCS. A URI that carries credentials is refused, so none reach logs, manifests or Ray.
"""

from __future__ import annotations

import functools
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from leaf_ray.errors import LeafRayError

OBJECT_STORES = ("s3", "gs")
# What must stay on local disk (reassembled bundled models, local copies of remote runs) when cache_root
# is an object store and storage.local_cache is unset.
DEFAULT_LOCAL_CACHE = Path("~/.cache/leaf-ray")
_FORMS = "a local path, file:///absolute/path, s3://bucket/prefix or gs://bucket/prefix"


class StorageError(LeafRayError, ValueError):
    """A storage root that cannot be used; the message names the config field."""


def parse_root(root: str, field: str) -> tuple[str, str]:
    """(scheme, path) of a storage root without touching the network: scheme "" for local paths (file://
    included), else "s3" / "gs" with path "bucket/prefix". Raises StorageError naming `field`."""
    if "://" not in root:
        return "", root
    parts = urlsplit(root)
    scheme = parts.scheme.lower()
    if scheme not in ("file", *OBJECT_STORES):
        raise StorageError(f"{field}: unsupported storage scheme {scheme!r} in {root!r}; use {_FORMS}")
    if "@" in parts.netloc:  # the URI itself is not echoed: it holds a secret
        raise StorageError(f"{field}: credentials in a {scheme}:// URI are refused; set them in the environment "
                           "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS)")
    if parts.query or parts.fragment:
        raise StorageError(f"{field}: {root!r} has a query or fragment; use {_FORMS} (endpoints go in "
                           "storage.endpoint_override, regions and credentials in the environment)")
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise StorageError(f"{field}: {root!r} is not an absolute file:// URI (file:///absolute/path)")
        return "", parts.path
    if not parts.netloc:
        raise StorageError(f"{field}: {root!r} names no bucket ({scheme}://bucket/prefix)")
    return scheme, f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")


def local_root(root: str, field: str) -> Path | None:
    """The absolute local directory of a local root (relative paths are taken from the working
    directory); None for an object store."""
    scheme, path = parse_root(root, field)
    if scheme:
        return None
    local = Path(path).expanduser()
    return local if local.is_absolute() else (Path.cwd() / local).resolve()


def check_endpoint(endpoint: str, field: str) -> None:
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or parts.path.strip("/"):
        raise StorageError(f"{field}: expected http(s)://host[:port] of an S3-compatible server "
                           "(credentials go in the environment)")


@functools.cache
def _object_store(scheme: str, bucket: str, endpoint_override: str | None) -> pafs.FileSystem:
    """One filesystem per bucket and endpoint (an S3 root without an endpoint looks up its bucket's region
    once, over the network)."""
    if scheme == "s3" and endpoint_override:
        parts = urlsplit(endpoint_override if "://" in endpoint_override else f"https://{endpoint_override}")
        return pafs.S3FileSystem(endpoint_override=parts.netloc, scheme=parts.scheme)
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def resolve(root: str | Path | StoragePath, field: str = "storage path",
            endpoint_override: str | None = None) -> StoragePath:
    """A storage root as a StoragePath. `endpoint_override` (http(s)://host:port) points s3:// roots at an
    S3-compatible server (MinIO, Ceph, moto); other schemes ignore it."""
    if isinstance(root, StoragePath):
        return root
    local = local_root(str(root), field)
    if local is not None:
        return StoragePath(pafs.LocalFileSystem(), str(local))
    scheme, path = parse_root(str(root), field)
    try:
        filesystem = _object_store(scheme, path.split("/", 1)[0], endpoint_override if scheme == "s3" else None)
    except (OSError, ValueError) as exc:
        raise StorageError(f"{field}: cannot open {scheme}://{path}: {exc}") from None
    return StoragePath(filesystem, path, scheme)


@dataclass(frozen=True)
class StoragePath:
    """A file or directory in a local or object-store filesystem. Picklable: Ray workers get the same
    filesystem (endpoint included; credentials are read from each process's environment)."""

    filesystem: pafs.FileSystem
    path: str  # inside `filesystem`: an absolute local path, or bucket/key for an object store
    scheme: str = ""  # "" local, else "s3" / "gs"

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> StoragePath:
        return self.at(self.path.rstrip("/").rsplit("/", 1)[0])

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> StoragePath:
        return replace(self, path=f"{self.path.rstrip('/')}/{name}")

    def at(self, path: str) -> StoragePath:
        """Another path in the same filesystem (e.g. one Ray Train reports)."""
        return replace(self, path=path)

    def native(self) -> Path | str:
        """A Path when local (what the rest of Python takes), else the URI."""
        return Path(self.path) if self.is_local else self.uri

    # -- reading --------------------------------------------------------------------------------------
    def _type(self) -> pafs.FileType:
        return self.filesystem.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def list(self) -> list[StoragePath]:
        """What lies directly under this directory (nothing if it does not exist)."""
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [self.at(info.path) for info in infos]

    # -- writing --------------------------------------------------------------------------------------
    def write_bytes(self, data) -> None:
        """Replace the file whole with `data` (bytes-like): readers see the old content or the new one,
        never a part."""
        if not self.is_local:
            with self.filesystem.open_output_stream(self.path) as out:
                out.write(data)
            return
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def append_text(self, text: str) -> None:
        """Append to a file; an object store has no append, so there the object is read and rewritten."""
        if self.is_local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as out:
                out.write(text)
            return
        self.write_bytes((self.read_bytes() if self.is_file() else b"") + text.encode())

    def mkdir(self) -> None:
        """Local directories only: object stores have no directories to make."""
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)

    def delete(self) -> None:
        """Remove this file or directory tree, if there."""
        kind = self._type()
        if kind == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.filesystem.delete_file(self.path)

    def upload(self, source: Path) -> None:
        """Make this location a copy of a local file or directory (a directory's old files are removed
        first; on an object store the directory is replaced file by file, not atomically)."""
        source = Path(source)
        if source.is_file():
            self.write_bytes(source.read_bytes())
            return
        self.delete()
        pafs.copy_files(str(source), self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.filesystem)

    def download(self, target: Path) -> None:
        """Copy this file or directory tree to a local path."""
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path, str(target), source_filesystem=self.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())

    def check_writable(self, field: str) -> None:
        """Fail before hours of work, not after: write and delete a probe file here. The error names the
        config field (missing bucket, no permission, unreachable endpoint, read-only disk)."""
        probe = self / ".write-probe"
        try:
            self.mkdir()
            probe.write_bytes(b"ok")
            probe.delete()
        except OSError as exc:
            raise StorageError(f"{field}: {self.uri} is not writable: {exc}") from None

    def ray_storage(self) -> dict:
        """Ray Train's RunConfig arguments for this location: an object store goes as its path inside the
        filesystem plus the filesystem itself, which carries any endpoint override to every worker."""
        if self.is_local:
            return {"storage_path": self.path}
        return {"storage_path": self.path, "storage_filesystem": self.filesystem}


@contextmanager
def local_copy(location: StoragePath):
    """A local directory holding `location`'s files: the directory itself when local, else a temporary
    download removed on exit (for readers that need a directory, like sentence-transformers)."""
    if location.is_local:
        yield Path(location.path)
        return
    with tempfile.TemporaryDirectory(prefix="leaf-copy-") as tmp:
        target = Path(tmp) / location.name
        location.download(target)
        yield target
