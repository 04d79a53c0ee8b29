"""Where outputs live: a local folder or an ``s3://bucket/prefix``, behind the few path operations
the pipeline uses.

``Location`` is the slice of ``pathlib.Path`` that prepare, training and evaluation need (``/``,
``name``, ``stem``, ``with_suffix``, ``is_file``, reading and writing text, bytes and JSON, listing,
removing a tree) over pyarrow's local and S3 filesystems, so a stage reads the same whether its
folder is on this disk or in a bucket. Writes are atomic: a local file is written beside its target
and renamed; an S3 object appears whole when its upload completes. A Location pickles as its URI and
the S3 settings (endpoint, region, retries; never credentials, which every node takes from its own
AWS chain), so Ray tasks on any node receive it as an argument.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from llm_ray.storage.s3 import (S3, S3Settings, StorageError, cached_filesystem, check_credentials, check_s3_uri,
                                put_if_absent, s3_error)


@dataclass(frozen=True)
class Location:
    """A file or folder: an absolute local path, or s3://bucket/key with the S3 settings to reach it."""

    uri: str
    s3: S3Settings | None = None

    def __post_init__(self):
        if self.s3 is not None:  # the plain settings, whatever object carried them (config.S3Config)
            object.__setattr__(self, "s3", S3Settings.of(self.s3))

    @classmethod
    def parse(cls, value: str | Path, s3: S3Settings | Any = None, field: str = "output_dir") -> "Location":
        """A Location from a config value, checked (scheme, bucket name, '..' segments) before any I/O."""
        text = str(value)
        if text.startswith("builtin:"):
            raise StorageError(f"{field}: {text!r} is a built-in corpus, not a folder")
        if "\x00" in text:
            raise StorageError(f"{field}: {text!r} contains a NUL byte")
        if "://" in text:
            check_s3_uri(text, field)
            return cls(S3 + text[len(S3):].strip("/"), S3Settings.of(s3))
        return cls(str(Path(text).expanduser().resolve()))

    # ------------------------------------------------------------ path arithmetic

    @property
    def remote(self) -> bool:
        return self.uri.startswith(S3)

    @property
    def path(self) -> str:
        """The path pyarrow's filesystem takes: the local path, or bucket/key."""
        return self.uri[len(S3):] if self.remote else self.uri

    @property
    def filesystem(self):
        if self.remote:
            return cached_filesystem(S3Settings.of(self.s3))
        from pyarrow import fs

        return fs.LocalFileSystem()

    def __truediv__(self, part: str) -> "Location":
        part = str(part)
        if part.startswith("/") or ".." in PurePosixPath(part).parts:
            raise ValueError(f"{part!r} is not a relative path inside {self.uri}")
        return Location(f"{self.uri.rstrip('/')}/{part}", self.s3)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def parent(self) -> "Location":
        return Location(self.uri.rsplit("/", 1)[0], self.s3)

    def with_suffix(self, suffix: str) -> "Location":
        return Location(self.uri[: len(self.uri) - len(PurePosixPath(self.path).suffix)] + suffix, self.s3)

    def local(self) -> Path:
        """The local path; a remote location has none (download it first)."""
        if self.remote:
            raise StorageError(f"{self.uri} is in object storage, not a local path")
        return Path(self.uri)

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """A local location is path-like (numpy, pyarrow and open() take it); a remote one is not."""
        return str(self.local())

    # ------------------------------------------------------------ reading

    def _info(self):
        return self.filesystem.get_file_info(self.path)

    def is_file(self) -> bool:
        return self._info().type.name == "File"

    def is_dir(self) -> bool:
        return self._info().type.name == "Directory"

    def exists(self) -> bool:
        return self._info().type.name != "NotFound"

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path, compression=None) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def open_input(self):
        """A seekable pyarrow file (what pyarrow.parquet reads)."""
        return self.filesystem.open_input_file(self.path)

    def iterdir(self) -> list["Location"]:
        from pyarrow import fs

        infos = self.filesystem.get_file_info(fs.FileSelector(self.path, allow_not_found=True))
        return sorted((Location(f"{self.uri.rstrip('/')}/{i.base_name}", self.s3) for i in infos), key=str)

    # ------------------------------------------------------------ writing

    def mkdir(self) -> None:
        """Create a local folder (S3 has no folders: a prefix exists once an object is under it)."""
        if not self.remote:
            Path(self.uri).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, data: bytes) -> None:
        if self.remote:
            with self.filesystem.open_output_stream(self.path, metadata={}) as f:
                f.write(data)
            return
        # A unique temporary name beside the target (mkstemp, made readable as a plain write would
        # be): two writers (a retried Ray task beside its first attempt) never share one, and a
        # reader never sees half a file.
        self._write_stream(io.BytesIO(data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_json(self, payload: Any) -> None:
        self.write_text(json.dumps(payload, indent=2, default=str))

    def write_new(self, data: bytes) -> bool:
        """Write data here only if nothing is here yet, in one step that writers on any node agree on:
        True if this call wrote it, False if something already was. Local: a complete file hard-linked
        to the name (a link never replaces a file; also on NFS); S3: a conditional PUT (If-None-Match: *,
        which AWS S3 honours since 2024, as do MinIO and moto; pyarrow cannot send it, boto3 can)."""
        if self.remote:
            return put_if_absent(self.uri, S3Settings.of(self.s3), data)
        target = Path(self.uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
        tmp.write_bytes(data)
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def rmtree(self) -> None:
        """Remove the folder and everything under it; nothing happens when it does not exist."""
        if not self.remote:
            shutil.rmtree(self.uri, ignore_errors=True)
            return
        if self.is_dir():
            self.filesystem.delete_dir(self.path)

    def files(self) -> list[str]:
        """The relative paths of the files under this folder, sorted."""
        from pyarrow import fs

        infos = self.filesystem.get_file_info(fs.FileSelector(self.path, recursive=True, allow_not_found=True))
        return sorted(i.path[len(self.path):].lstrip("/") for i in infos if i.type == fs.FileType.File)

    def upload(self, local: Path) -> None:
        """Copy a local file or folder here (a folder's files keep their relative paths), streamed."""
        local = Path(local)
        if not local.is_dir():
            with open(local, "rb") as src:
                self._write_stream(src)
            return
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            (self / file.relative_to(local).as_posix()).upload(file)

    def download(self, dest: Path) -> Path:
        """Copy this file, or this folder's files, to the local dest: streamed, atomically per file."""
        dest = Path(dest)
        if not self.is_file():
            for rel in self.files():
                (self / rel).download(dest / rel)
            return dest
        with self.filesystem.open_input_stream(self.path, compression=None) as src:
            Location(str(dest.resolve()))._write_stream(src)
        return dest

    def _write_stream(self, src) -> None:
        """Write what the binary stream src holds here, in 8 MiB pieces (atomic like write_bytes)."""
        if self.remote:
            with self.filesystem.open_output_stream(self.path, metadata={}) as f:
                shutil.copyfileobj(src, f, 8 << 20)
            return
        target = Path(self.uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Created like open() creates files (mode 0o666 less the umask, which the kernel applies), under
        # a name no other writer picks; renamed over the target once whole.
        tmp = str(target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(src, f, 8 << 20)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def as_location(value: "str | Path | Location", s3: S3Settings | Any = None, field: str = "--data") -> Location:
    """value as a Location (a Location is returned as it is)."""
    return value if isinstance(value, Location) else Location.parse(value, s3, field)


def check_writable(location: Location, field: str = "output_dir") -> None:
    """Raise StorageError naming field when location cannot be written: a local folder that cannot be
    created, S3 without credentials or without its bucket. Nothing secret is quoted."""
    if not location.remote:
        folder = Path(location.uri)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise StorageError(f"{field}: cannot write the folder {folder}: {e.strerror or type(e).__name__}") from None
        return
    s3 = S3Settings.of(location.s3)
    if s3.anonymous:
        raise StorageError(f"{field}: {location.uri}: cannot write anonymously; set data.s3.anonymous: false "
                           "and provide credentials")
    check_credentials(location.uri, s3, field)
    bucket = location.path.split("/")[0]
    try:
        missing = location.filesystem.get_file_info(bucket).type.name == "NotFound"
    except OSError as e:
        raise s3_error(location.uri, e, field) from None
    if missing:
        raise StorageError(f"{field}: {location.uri}: the bucket does not exist")


@contextlib.contextmanager
def local_folder(target: Location) -> Iterator[Path]:
    """A local folder to write files into for target: target itself when local, else a temporary folder
    uploaded to target when the block ends without error (for files that libraries write by path)."""
    if not target.remote:
        target.mkdir()
        yield target.local()
        return
    with tempfile.TemporaryDirectory(prefix="llm-ray-upload-") as tmp:
        yield Path(tmp)
        target.upload(Path(tmp))


def local_copy(location: Location, cache: Path) -> Path:
    """A local path holding location's file: itself when local, else a copy in cache made once per node
    (workers on one node share it: the copy is written beside its name and renamed)."""
    if not location.remote:
        return Path(location.uri)
    target = cache / location.name
    if target.is_file():
        return target
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{location.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other workers wait for this copy instead of making theirs
        if not target.is_file():
            location.download(target)
    return target


def check_shared(paths: dict[str, Location], nodes: int, shared_filesystem: bool) -> None:
    """Refuse local paths on a multi-node cluster unless the user says they are on a shared filesystem:
    other nodes' tasks and workers would write and read folders that exist only on their own disk."""
    local = {field: loc for field, loc in paths.items() if loc is not None and not loc.remote}
    if nodes <= 1 or shared_filesystem or not local:
        return
    listing = ", ".join(f"{field} ({loc.uri})" for field, loc in local.items())
    raise StorageError(f"this Ray cluster has {nodes} nodes, but {listing} "
                       f"{'is a local path' if len(local) == 1 else 'are local paths'}: each node would see its "
                       "own disk. Use s3://bucket/prefix URIs, or set data.shared_filesystem: true if the path is "
                       "on a filesystem every node mounts (NFS, EFS, Lustre)")
