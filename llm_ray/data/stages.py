"""Resumable stages: each writes its outputs plus a `_stage.json` naming what it was built from.

A stage's folder is a ``Location``: a local folder or an S3 prefix, written the same way.
A stage's key hashes its inputs' fingerprints, the config fields it depends on, the
package version and the keys of the stages before it. A rerun whose key matches a
complete stage skips it; a changed key clears the folder and reruns it (and, through
the keys, everything downstream). Within a stage, shards are finished one by one, so an
interrupted run redoes only the shards that were not complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Callable

from llm_ray import __version__
from llm_ray.data.corpus import CorpusError
from llm_ray.data.errors import PrepareError
from llm_ray.storage import Location, StorageError

STAGE_FILE = "_stage.json"
# Inside a Ray Tune trial (a sweep's trial prepares its data variant), tasks would otherwise be
# placed in the trial's placement group, which reserves nothing for them; Ray Data does the same.
OUTSIDE_PLACEMENT_GROUPS = "DEFAULT"


def stage_key(name: str, *parts: Any) -> str:
    blob = json.dumps([name, __version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def run(name: str, directory: Location, key: str, build: Callable[[Location, str], dict], log) -> dict:
    """A resumable stage's record: the complete one in directory when it was built with key (the stage
    is up to date and skipped); else directory is opened for key (finished shards of the same key kept,
    anything else cleared), build(directory, key) writes the stage's outputs and returns the record's
    fields, and the record is written complete."""
    if (record := completed(directory, key)) is not None:
        log(f"{name}: up to date, skipped")
        return record
    begin(directory, key)
    return finish(directory, key, build(directory, key))


def completed(directory: Location, key: str) -> dict | None:
    """The stage record if directory holds a complete stage built with key, else None."""
    try:
        record = (directory / STAGE_FILE).read_json()
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key and record.get("complete") else None


def begin(directory: Location, key: str) -> None:
    """Open a stage for (re)building: keep finished shards of the same key, clear anything else."""
    try:
        record = (directory / STAGE_FILE).read_json()
    except (OSError, ValueError):
        record = None
    if record is None or record.get("key") != key:
        directory.rmtree()
    directory.mkdir()
    (directory / STAGE_FILE).write_json({"key": key, "complete": False})


def finish(directory: Location, key: str, info: dict) -> dict:
    record = {"key": key, "complete": True, "version": __version__, **info}
    (directory / STAGE_FILE).write_json(record)
    return record


def task_per_item(items: list[dict], fn, **fn_kwargs):
    """A dataset applying fn to each item in its own Ray task (fn gets a batch of one item).

    Used for shards: ray.data.read_parquet would first list files in one task and may pack
    many small shards into a single task, leaving cores idle; the shard list is known here.
    """
    import ray.data

    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        fn, batch_size=1, batch_format="numpy", fn_kwargs=fn_kwargs)


@functools.lru_cache(maxsize=None)
def _remote(fn, max_calls: int):
    import ray

    return ray.remote(max_calls=max_calls)(fn)  # once per function, not once per task


def task(fn, max_calls: int = 0, **options):
    """fn as a Ray task (call .remote(...) on it), placed outside any placement group. max_calls: how
    many such tasks a worker process runs before it exits (0: no limit; Ray takes it only here)."""
    return _remote(fn, max_calls).options(scheduling_strategy=OUTSIDE_PLACEMENT_GROUPS, **options)


def returns(chunks: list):
    """A task's return value for num_returns=len(chunks) (Ray wants the object itself for one)."""
    return chunks[0] if len(chunks) == 1 else tuple(chunks)


def submit(fn, num_returns: int, *args) -> list:
    """fn as a Ray task (see task) with num_returns return values: the list of their references."""
    refs = task(fn, num_returns=num_returns).remote(*args)
    return refs if num_returns > 1 else [refs]


def column(grid: list[list], k: int) -> list:
    """The k-th reference of each task's list: what one partition (or shard) receives from every task."""
    return [refs[k] for refs in grid]


def result(ref):
    """ray.get(ref), a task's failure raised as the error the user should see: a PrepareError,
    StorageError or CorpusError as itself (no remote traceback around it), an OSError (writing a shard
    or a marker) as a PrepareError naming it; anything else as Ray reports it."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as e:
        cause = e.cause
        if isinstance(cause, (PrepareError, StorageError, CorpusError)):
            raise type(cause)(str(cause)) from None
        if isinstance(cause, OSError):
            raise PrepareError(f"a prepare task could not read or write its files: {cause}") from None
        raise
