"""Corpus sources: validating URIs, listing files, and streaming one file's documents.

A source is a local file, folder or glob, an ``s3://bucket/prefix`` URI (AWS or any
S3-compatible endpoint, through pyarrow's S3 filesystem, see ``storage``), or ``builtin:NAME``.
URIs are checked before any I/O. Credentials come from the standard AWS chain only and never
appear in a message.

``iter_documents`` streams one file as (doc_key, text) pairs: compression is undone by suffix
(.gz, .bz2, .zst) as the bytes arrive, JSON Lines and text are split line by line, a JSON array
element by element and parquet row group by row group, so the memory it takes is one block plus
one document whatever the size of the file. Bad content never raises out of it: a truncated
archive, a binary file or a file that vanished stops the file with a ``ReadError`` that names
the reason (the documents before it were already handed on); invalid UTF-8 is replaced or
dropped per config, and every skipped record is counted.
"""

from __future__ import annotations

import codecs
import glob
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from llm_ray.config import DataConfig
from llm_ray.data.corpus import BUILTIN_CORPORA, BUILTIN_PREFIX, CorpusError
from llm_ray.storage import Location, StorageError, check_credentials, check_s3_uri, s3_error, s3_reason

TEXT_FORMATS = (".txt", ".jsonl", ".json")
COMPRESSIONS = ("", ".gz", ".bz2", ".zst")  # what pyarrow's compression="detect" knows by suffix
SUFFIXES = tuple(f + c for f in TEXT_FORMATS for c in COMPRESSIONS) + (".parquet",)
SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB (after decompression) marks a file as binary
BLOCK_BYTES = 1 << 20  # what one read takes from the (decompressed) stream
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class FileRef:
    """One input file: its URI (local absolute path or s3://...), size and modification time."""

    uri: str
    size: int
    mtime: float

    @property
    def fingerprint(self) -> str:
        return f"{self.uri}|{self.size}|{self.mtime:.6f}"


class ReadError(Exception):
    """A file that cannot be read (further): the reason, for the report's list of failed files."""


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
    try:
        check_s3_uri(source, field)
    except StorageError as e:
        raise CorpusError(str(e)) from None
    return "s3"


# ---------------------------------------------------------------- listing


def _has_suffix(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def list_sources(sources: list[str], data: DataConfig, field: str = "data.sources") -> list[FileRef]:
    """Every readable file the sources name, sorted by URI. Raises CorpusError naming a bad source."""
    for source in sources:
        check_uri(source, field)  # all of them before touching anything
    found: dict[str, FileRef] = {}
    for source in sources:
        scheme = check_uri(source, field)
        if scheme == "s3":
            refs = _list_s3(source, data, field)
        else:
            if scheme == "builtin":
                source = str(BUILTIN_CORPORA[source[len(BUILTIN_PREFIX):]]())
            refs = _list_local(source, field)
        if not refs:
            raise CorpusError(f"{field}: {source!r} holds no {', '.join(SUFFIXES)} files")
        found.update((r.uri, r) for r in refs)
    return [found[k] for k in sorted(found)]


def _list_local(source: str, field: str) -> list[FileRef]:
    path = Path(source).expanduser()
    if path.is_dir():
        paths = [p for p in path.rglob("*") if p.is_file()]
    elif glob.has_magic(source):
        paths = [Path(p) for p in glob.glob(str(path), recursive=True)]
    elif path.is_file():
        paths = [path]
    else:
        raise CorpusError(f"{field}: {source!r} does not exist")
    refs = []
    for p in paths:
        if _has_suffix(p.name) and p.is_file():
            st = p.stat()
            refs.append(FileRef(str(p.resolve()), st.st_size, st.st_mtime))
    return refs


def _list_s3(uri: str, data: DataConfig, field: str) -> list[FileRef]:
    from pyarrow import fs

    try:
        check_credentials(uri, data.s3, field)
        filesystem = Location.parse(uri, data.s3, field).filesystem
        key = uri[len("s3://"):].rstrip("/")
        info = filesystem.get_file_info(key)
        if info.type == fs.FileType.File:
            infos = [info]
        elif info.type == fs.FileType.Directory or "/" in key:
            infos = filesystem.get_file_info(fs.FileSelector(key, recursive=True, allow_not_found=True))
        else:  # a bucket that get_file_info reports as missing
            raise CorpusError(f"{field}: {uri}: the bucket does not exist")
    except StorageError as e:
        raise CorpusError(str(e)) from None
    except OSError as e:
        raise CorpusError(str(s3_error(uri, e, field))) from None
    return [FileRef("s3://" + i.path, i.size or 0, i.mtime.timestamp() if i.mtime else 0.0)
            for i in infos if i.type == fs.FileType.File and _has_suffix(i.path)]


# ---------------------------------------------------------------- streaming one file


def _base_name(uri: str) -> str:
    name = PurePosixPath(uri).name.lower()
    for c in COMPRESSIONS[1:]:
        if name.endswith(c):
            return name[: -len(c)]
    return name


def _open(uri: str, data: DataConfig):
    """A stream of the file's decompressed bytes (compression detected from the suffix)."""
    location = Location(uri, data.s3 if uri.startswith("s3://") else None)
    return location.filesystem.open_input_stream(location.path, compression="detect")


def _blocks(stream) -> Iterator[bytes]:
    while block := stream.read(BLOCK_BYTES):
        yield block


def _lines(blocks: Iterator[bytes], limit: int, counts: Counter, line_no: int = 0) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a byte stream, without line ends, numbered after line_no lines already
    passed. A line longer than limit is skipped as it streams (counted as document_too_large)."""
    carry, carried, skipping = [], 0, False  # the pieces of a line that spans blocks (joined once)
    for block in blocks:
        parts = block.split(b"\n")
        for part in parts[:-1]:
            line_no += 1
            if skipping:
                skipping = False
            elif carried + len(part) > limit:
                counts["document_too_large"] += 1
            else:
                yield line_no, b"".join(carry) + part if carry else part
            carry, carried = [], 0
        if skipping:
            continue
        carry.append(parts[-1])
        carried += len(parts[-1])
        if carried > limit:
            counts["document_too_large"] += 1
            carry, carried, skipping = [], 0, True
    if carried and not skipping:
        yield line_no + 1, b"".join(carry)


def _decode(raw: bytes, policy: str, counts: Counter) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if policy == "drop":
            counts["invalid_utf8_dropped"] += 1
            return None
        counts["invalid_utf8_replaced"] += 1
        return raw.decode("utf-8", errors="replace")


def _json_lines(uri: str, lines, data: DataConfig, counts: Counter) -> Iterator[tuple[str, str]]:
    for line_no, line in lines:
        if not line.strip():
            continue
        text = _decode(line, data.invalid_utf8, counts)
        if text is None:
            continue
        try:
            record = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError, an integer of over 4,300 digits, [[[[...
            counts["invalid_json_line"] += 1
            continue
        yield from _record_text(f"{uri}:{line_no}", record, data.text_field, counts)


def _record_text(key: str, record, text_field: str, counts: Counter) -> Iterator[tuple[str, str]]:
    value = record.get(text_field) if isinstance(record, dict) else None
    if isinstance(value, str):
        yield key, value
    else:
        counts["missing_text_field"] += 1


def _json_array(uri: str, blocks: Iterator[bytes], data: DataConfig, limit: int,
                counts: Counter) -> Iterator[tuple[str, str]]:
    """The records of a JSON array, decoded one element at a time (json's raw_decode on a sliding
    buffer): memory is one element plus one block, not the whole array."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("replace" if data.invalid_utf8 == "replace" else "strict")
    buffer, pos, index, done, started = "", 0, 0, False, False

    def more() -> None:
        nonlocal buffer, pos, done
        block = next(blocks, None)
        try:
            piece = utf8.decode(block or b"", final=block is None)
        except UnicodeDecodeError:
            raise ReadError("invalid UTF-8 in a JSON array (data.invalid_utf8: drop drops the file)") from None
        if "\ufffd" in piece:
            counts["invalid_utf8_replaced"] += 1
        buffer, pos, done = buffer[pos:] + piece, 0, block is None

    more()
    while True:
        while pos < len(buffer) and buffer[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(buffer):
            if done:
                raise ReadError("truncated JSON array: no closing ']'")
            more()
            continue
        if not started:
            started = buffer[pos] == "["
            pos += 1
            continue
        if buffer[pos] == "]":
            return
        try:
            record, end = decoder.raw_decode(buffer, pos)
        except RecursionError:
            raise ReadError(f"JSON array element {index} is nested too deeply") from None
        except ValueError:  # JSONDecodeError (maybe only incomplete), or a number too long to convert
            if len(buffer) - pos > limit:
                raise ReadError(f"JSON array element {index} is invalid or larger than data.max_document_mb "
                                f"({data.max_document_mb})") from None
            if done:
                raise ReadError(f"invalid or truncated JSON array at element {index}") from None
            more()
            continue
        yield from _record_text(f"{uri}:{index}", record, data.text_field, counts)
        index, pos = index + 1, end


def _text_file(uri: str, blocks: Iterator[bytes], data: DataConfig, limit: int, counts: Counter,
               blank_lines: int) -> Iterator[tuple[str, str]]:
    """A .txt file as one document (txt_mode 'file'; leading blank lines left out), or one per line."""
    if data.txt_mode == "line":
        for line_no, line in _lines(blocks, limit, counts, blank_lines):
            text = _decode(line, data.invalid_utf8, counts)
            if text is not None and text.strip():
                yield f"{uri}:{line_no}", text
        return
    pieces, size = [], 0
    for block in blocks:
        size += len(block)
        if size > limit:  # read on to the end (a truncated archive is still reported), holding nothing
            pieces = None
        elif pieces is not None:
            pieces.append(block)
    if pieces is None:
        counts["document_too_large"] += 1
        return
    text = _decode(b"".join(pieces), data.invalid_utf8, counts)
    if text is not None and text.strip():
        yield uri, text


def _parquet(uri: str, data: DataConfig, limit: int, counts: Counter) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    location = Location(uri, data.s3 if uri.startswith("s3://") else None)
    try:
        with location.open_input() as handle, pq.ParquetFile(handle) as reader:
            yield from _parquet_rows(uri, reader, data.text_field, limit, counts)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ReadError(f"corrupt parquet: {str(e)[:200]}") from None


def _parquet_rows(uri: str, reader, text_field: str, limit: int, counts: Counter) -> Iterator[tuple[str, str]]:
    if text_field not in reader.schema_arrow.names:
        raise ReadError(f"no column {text_field!r} (data.text_field)")
    row = 0
    for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str) and value.strip():
                if len(value) > limit:
                    counts["document_too_large"] += 1
                else:
                    yield f"{uri}:{row}", value
            elif value is not None:
                counts["missing_text_field"] += 1
            row += 1


def iter_documents(uri: str, data: DataConfig, counts: Counter) -> Iterator[tuple[str, str]]:
    """Stream the (doc_key, text) documents of one file. Skipped records are counted in counts
    (invalid_json_line, missing_text_field, invalid_utf8_*, document_too_large, empty_file); a file
    that cannot be read on raises ReadError with the reason."""
    limit = int(data.max_document_mb * 1e6)
    name = _base_name(uri)
    try:
        if name.endswith(".parquet"):
            yield from _parquet(uri, data, limit, counts)
            return
        with _open(uri, data) as stream:
            blocks = _blocks(stream)
            first, blank_lines = next(blocks, b""), 0
            while first is not None and not first.strip():  # leading whitespace: held as a line count only
                blank_lines += first.count(b"\n")
                first = next(blocks, None)
            if first is None:
                counts["empty_file"] += 1
                return
            if b"\x00" in first[:SNIFF_BYTES]:
                raise ReadError("binary: NUL bytes in what should be text")
            blocks = _chain(first, blocks)
            if name.endswith(".json") and first.lstrip()[:1] == b"[":
                yield from _json_array(uri, blocks, data, limit, counts)
            elif name.endswith((".jsonl", ".json")):
                yield from _json_lines(uri, _lines(blocks, limit, counts, blank_lines), data, counts)
            else:
                yield from _text_file(uri, blocks, data, limit, counts, blank_lines)
    except FileNotFoundError:
        raise ReadError("vanished: the file disappeared before it was read") from None
    except OSError as e:
        raise ReadError(_os_reason(uri, e)) from None


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


_ARCHIVES = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}


def _os_reason(uri: str, e: OSError) -> str:
    """Why reading stopped: an S3 error (by its AWS error code), a damaged archive, or the OS's reason."""
    text = str(e)
    if uri.startswith("s3://") and "AWS Error" in text:
        return "unreadable: " + s3_reason(e)
    archive = _ARCHIVES.get(PurePosixPath(uri).suffix.lower())
    if archive and not e.errno:  # pyarrow's codecs raise errno-less OSErrors for bad compressed data
        return f"truncated or corrupt {archive}: {text[:200]}"
    return f"unreadable: {type(e).__name__}: {e.strerror or text[:200]}"
