"""Corpus sources: validating URIs, listing files, and reading one file into documents.

A source is a local file, folder or glob, an ``s3://bucket/prefix`` URI (AWS or any
S3-compatible endpoint, through pyarrow's S3 filesystem), or ``builtin:NAME``. URIs are
checked before any I/O. Credentials come from the standard AWS chain only and never
appear in a message.

``read_file`` turns one file into documents and never raises for bad content: a
truncated gzip, a binary file or a file that vanished becomes a named failure, and
invalid UTF-8 is replaced or dropped per config, so the pipeline can count everything.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import random
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, TypeVar
from urllib.parse import urlsplit

from llm_ray.config import DataConfig, S3Config
from llm_ray.data.corpus import BUILTIN_CORPORA, BUILTIN_PREFIX, CorpusError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".txt.gz", ".jsonl.gz", ".json.gz")
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's bucket naming rules
SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a file as binary
T = TypeVar("T")


@dataclass(frozen=True)
class FileRef:
    """One input file: its URI (local absolute path or s3://...), size and modification time."""

    uri: str
    size: int
    mtime: float

    @property
    def fingerprint(self) -> str:
        return f"{self.uri}|{self.size}|{self.mtime:.6f}"


# ---------------------------------------------------------------- validating


def check_uri(source: str, field: str = "data.sources") -> str:
    """The source's scheme ('', 's3' or 'builtin'); raises CorpusError, naming the config field,
    before any I/O otherwise."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_CORPORA:
            raise CorpusError(f"{field}: unknown built-in corpus {source!r}; available: "
                              + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA))
        return "builtin"
    if "://" not in source:
        if "\x00" in source:
            raise CorpusError(f"{field}: {source!r} contains a NUL byte")
        return ""
    parts = urlsplit(source)
    if parts.scheme != "s3":
        raise CorpusError(f"{field}: {source!r}: unsupported scheme {parts.scheme!r}; "
                          "use a local path or s3://bucket/prefix")
    if not parts.netloc or parts.query or parts.fragment or "@" in parts.netloc:
        raise CorpusError(f"{field}: {source!r} is not a valid s3://bucket/prefix URI")
    if not BUCKET_NAME.fullmatch(parts.netloc) or ".." in parts.netloc:
        raise CorpusError(f"{field}: {source!r}: {parts.netloc!r} is not a valid S3 bucket name (3-63 lowercase "
                          "letters, digits, dots and hyphens, starting and ending with a letter or digit)")
    if any(seg in ("..", ".") for seg in parts.path.split("/")):
        raise CorpusError(f"{field}: {source!r}: '.' and '..' segments are not allowed in S3 keys")
    return "s3"


def s3_filesystem(s3: S3Config):
    """pyarrow's S3 filesystem: credentials from the AWS chain, retries with backoff on throttling and 5xx."""
    from pyarrow import fs

    kwargs = dict(region=s3.region, connect_timeout=s3.connect_timeout_s, request_timeout=s3.request_timeout_s,
                  retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=s3.max_attempts),
                  anonymous=s3.anonymous)
    if s3.endpoint_url:
        parts = urlsplit(s3.endpoint_url)
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    return fs.S3FileSystem(**kwargs)


def check_credentials(uri: str, s3: S3Config, field: str = "data.sources") -> None:
    """Fail fast, naming the URI, when the AWS chain (environment, shared files, profile, container
    or instance role) has no credentials; pyarrow would otherwise send unsigned requests.

    The check asks boto3's chain; pyarrow reads with the AWS C++ SDK's, which covers the same
    common sources but may differ on exotic ones (SSO, credential_process)."""
    if s3.anonymous:
        return
    import boto3

    if boto3.Session().get_credentials() is None:
        raise CorpusError(f"{field}: {uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, a profile, or an instance role; or data.s3.anonymous: true "
                          "for a public bucket)")


def s3_error(uri: str, err: Exception, field: str = "data.sources") -> CorpusError:
    text = str(err)
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        why = "the bucket does not exist"
    elif "AccessDenied" in text or "403" in text or "InvalidAccessKeyId" in text or "credentials" in text.lower():
        why = "access denied or no credentials (set them through the standard AWS chain: environment, profile, role)"
    elif "curl" in text.lower() or "connect" in text.lower() or "resolve" in text.lower():
        why = "cannot connect to the endpoint (check data.s3.endpoint_url and data.s3.region)"
    else:
        why = type(err).__name__
    return CorpusError(f"{field}: {uri}: {why}")


# ---------------------------------------------------------------- listing


def _has_suffix(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def list_sources(sources: list[str], data: DataConfig) -> list[FileRef]:
    """Every readable file the sources name, sorted by URI. Raises CorpusError naming a bad source."""
    for source in sources:
        check_uri(source)  # all of them before touching anything
    found: dict[str, FileRef] = {}
    for source in sources:
        scheme = check_uri(source)
        if scheme == "s3":
            refs = _list_s3(source, data.s3)
        else:
            if scheme == "builtin":
                source = str(BUILTIN_CORPORA[source[len(BUILTIN_PREFIX):]]())
            refs = _list_local(source)
        if not refs:
            raise CorpusError(f"data.sources: {source!r} holds no {', '.join(SUFFIXES)} files")
        found.update((r.uri, r) for r in refs)
    return [found[k] for k in sorted(found)]


def _list_local(source: str) -> list[FileRef]:
    path = Path(source).expanduser()
    if path.is_dir():
        paths = [p for p in path.rglob("*") if p.is_file()]
    elif glob.has_magic(source):
        paths = [Path(p) for p in glob.glob(str(path), recursive=True)]
    elif path.is_file():
        paths = [path]
    else:
        raise CorpusError(f"data.sources: {source!r} does not exist")
    refs = []
    for p in paths:
        if _has_suffix(p.name) and p.is_file():
            st = p.stat()
            refs.append(FileRef(str(p.resolve()), st.st_size, st.st_mtime))
    return refs


def _list_s3(uri: str, s3: S3Config) -> list[FileRef]:
    from pyarrow import fs

    check_credentials(uri, s3)
    filesystem = s3_filesystem(s3)
    key = uri[len("s3://"):].rstrip("/")
    try:
        info = filesystem.get_file_info(key)
        if info.type == fs.FileType.File:
            infos = [info]
        elif info.type == fs.FileType.Directory or "/" in key:
            infos = filesystem.get_file_info(fs.FileSelector(key, recursive=True, allow_not_found=True))
        else:  # a bucket that get_file_info reports as missing
            raise CorpusError(f"data.sources: {uri}: the bucket does not exist")
    except OSError as e:
        raise s3_error(uri, e) from None
    return [FileRef("s3://" + i.path, i.size or 0, i.mtime.timestamp() if i.mtime else 0.0)
            for i in infos if i.type == fs.FileType.File and _has_suffix(i.path)]


# ---------------------------------------------------------------- reading


@dataclass
class FileResult:
    """What one file gave: documents as (doc_key, text), or the reason it failed, plus counters."""

    uri: str
    docs: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    counts: Counter = field(default_factory=Counter)  # e.g. invalid_utf8_replaced, invalid_json_line
    bytes_read: int = 0


def is_transient(err: BaseException) -> bool:
    """Throttling and server errors worth retrying (S3 SlowDown, 503, 500, timeouts)."""
    text = str(err)
    return any(s in text for s in ("SlowDown", "503", "500 ", "Throttl", "RequestTimeout", "timed out",
                                   "Service Unavailable", "InternalError"))


def with_retries(fn: Callable[[], T], attempts: int, base_delay_s: float = 0.2, sleep=time.sleep) -> T:
    """Call fn, retrying transient errors with exponential backoff and jitter."""
    for attempt in range(attempts):
        try:
            return fn()
        except OSError as e:
            if attempt == attempts - 1 or not is_transient(e):
                raise
            sleep(base_delay_s * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _read_bytes(uri: str, s3: S3Config) -> bytes:
    if uri.startswith("s3://"):
        filesystem = s3_filesystem(s3)

        def fetch() -> bytes:
            # compression=None: gzip is undone below, the same way for local and S3 files
            with filesystem.open_input_stream(uri[len("s3://"):], compression=None) as f:
                return f.read()

        return with_retries(fetch, s3.max_attempts)
    with open(uri, "rb") as f:
        return f.read()


def _decode(raw: bytes, policy: str, result: FileResult) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if policy == "drop":
            result.counts["invalid_utf8_dropped"] += 1
            return None
        result.counts["invalid_utf8_replaced"] += 1
        return raw.decode("utf-8", errors="replace")


def _base_name(uri: str) -> str:
    return PurePosixPath(uri).name.lower()


def read_file(ref: FileRef | str, data: DataConfig) -> FileResult:
    """Documents of one file. Never raises for bad content: failures are named in result.error."""
    uri = ref.uri if isinstance(ref, FileRef) else ref
    result = FileResult(uri)
    name = _base_name(uri)
    try:
        raw = _read_bytes(uri, data.s3)
    except FileNotFoundError:
        result.error = "vanished: the file disappeared before it was read"
        return result
    except OSError as e:
        result.error = f"unreadable: {type(e).__name__}: {e.strerror or str(e)[:200]}"
        return result
    result.bytes_read = len(raw)
    if name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            result.error = f"truncated or corrupt gzip: {e}"
            return result
        name = name[:-3]
    if not raw.strip():
        result.counts["empty_file"] += 1
        return result
    if name.endswith(".parquet"):
        return _read_parquet(raw, uri, data, result)
    if b"\x00" in raw[:SNIFF_BYTES]:
        result.error = "binary: NUL bytes in what should be text"
        return result
    if name.endswith((".jsonl", ".json")):
        for line_no, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            text = _decode(line, data.invalid_utf8, result)
            if text is None:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                result.counts["invalid_json_line"] += 1
                continue
            value = record.get(data.text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                result.counts["missing_text_field"] += 1
                continue
            result.docs.append((f"{uri}:{line_no}", value))
        return result
    if data.txt_mode == "line":
        for line_no, line in enumerate(raw.splitlines(), start=1):
            text = _decode(line, data.invalid_utf8, result)
            if text is not None and text.strip():
                result.docs.append((f"{uri}:{line_no}", text))
        return result
    text = _decode(raw, data.invalid_utf8, result)
    if text is not None:
        result.docs.append((uri, text))
    return result


def _read_parquet(raw: bytes, uri: str, data: DataConfig, result: FileResult) -> FileResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw), columns=[data.text_field])
    except (pa.ArrowInvalid, OSError) as e:
        message = str(e)
        if data.text_field in message or "No match for FieldRef" in message:
            result.error = f"no column {data.text_field!r} (data.text_field)"
        else:
            result.error = f"corrupt parquet: {message[:200]}"
        return result
    for row, value in enumerate(table.column(0).to_pylist()):
        if isinstance(value, str) and value.strip():
            result.docs.append((f"{uri}:{row}", value))
        elif value is not None:
            result.counts["missing_text_field"] += 1
    return result


