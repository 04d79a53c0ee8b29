"""Resumable stages: each writes its outputs plus a `_stage.json` naming what it was built from.

A stage's key hashes its inputs' fingerprints, the config fields it depends on, the
package version and the keys of the stages before it. A rerun whose key matches a
complete stage skips it; a changed key clears the folder and reruns it (and, through
the keys, everything downstream). Within a stage, shards are finished one by one, so an
interrupted run redoes only the shards that were not complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from llm_ray import __version__

STAGE_FILE = "_stage.json"


def stage_key(name: str, *parts: Any) -> str:
    blob = json.dumps([name, __version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A fresh temporary file beside target, renamed onto it when the block ends without error.

    The name is unique (mkstemp), so two tasks writing the same target (a retried Ray task
    beside its first attempt) never write into one temporary file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON so that a reader never sees half a file (write to a temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def completed(directory: Path, key: str) -> dict | None:
    """The stage record if directory holds a complete stage built with key, else None."""
    try:
        record = json.loads((directory / STAGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key and record.get("complete") else None


def begin(directory: Path, key: str) -> None:
    """Open a stage for (re)building: keep finished shards of the same key, clear anything else."""
    try:
        record = json.loads((directory / STAGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if record is None or record.get("key") != key:
        shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / STAGE_FILE, {"key": key, "complete": False})


def finish(directory: Path, key: str, info: dict) -> dict:
    record = {"key": key, "complete": True, "version": __version__, **info}
    write_json_atomic(directory / STAGE_FILE, record)
    return record


def task_per_item(items: list[dict], fn, **fn_kwargs):
    """A dataset applying fn to each item in its own Ray task (fn gets a batch of one item).

    Used for shards: ray.data.read_parquet would first list files in one task and may pack
    many small shards into a single task, leaving cores idle; the shard list is known here.
    """
    import ray.data

    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        fn, batch_size=1, batch_format="numpy", fn_kwargs=fn_kwargs)
