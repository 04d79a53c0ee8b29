"""Train/validation/test membership and the kept documents of each split.

A document's split is a function of its duplicate cluster's key (content only, see
``prepare.content_keys``) and ``data.split_seed``, through two thresholds on a stable hash.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from llm_ray.config import DataConfig
from llm_ray.data import transforms
from llm_ray.data.dedup_stage import split_summary
from llm_ray.data.errors import PrepareError
from llm_ray.data.stages import task_per_item
from llm_ray.memory import release_freed
from llm_ray.storage import Location, as_location


def read_kept(docs_shard: Location, keep_dir: Location):
    """The kept documents of one documents shard, with their cluster keys (a pyarrow table)."""
    import pyarrow.parquet as pq

    release_freed()  # a worker reads one shard after another: not the high-water mark of all of them
    keep = pq.read_table((keep_dir / docs_shard.name).open_input())
    docs = pq.read_table(docs_shard.open_input(), columns=["doc_key", "text"])
    return docs.take(keep.column("row")).append_column("cluster_key", keep.column("cluster_key"))


def _load_kept(batch: dict, keep_dir: Location):
    import pyarrow as pa

    return pa.concat_tables([read_kept(Location(str(uri), keep_dir.s3), keep_dir) for uri in batch["uri"]])


def read_kept_shards(shards: list[Location], keep_dir: Location):
    """A dataset over the kept documents (doc_key, text, cluster_key), one task per documents shard."""
    return task_per_item([{"uri": p.uri} for p in shards], _load_kept, keep_dir=keep_dir)


def split_thresholds(cluster_keys: list[str], data: DataConfig) -> tuple[float, float]:
    """(val, val + test) bounds on split keys, nudged so that every requested split is non-empty."""
    return thresholds_from_summary(split_summary(cluster_keys, data.split_seed, data.val_fraction), data)


def thresholds_from_summary(summary: dict, data: DataConfig) -> tuple[float, float]:
    """split_thresholds from a mergeable summary of the cluster keys (dedup_stage.split_summary):
    their count, two smallest distinct split hashes u, smallest u >= val_fraction, largest u."""
    wanted = 2 + (data.test_fraction > 0)
    if summary["count"] < wanted:
        raise PrepareError(f"{summary['count']} distinct document(s) after dedup; at least {wanted} are needed for "
                           "train and held-out splits: add documents")
    smallest = summary["smallest"]
    val_t = max(data.val_fraction, float(np.nextafter(smallest[0], 1)))
    test_t = val_t + data.test_fraction
    if data.test_fraction > 0:
        # The smallest u >= val_t: above val_fraction, or past the smallest u when val_t moved there.
        following = summary["min_above_val"] if val_t == data.val_fraction else (
            smallest[1] if len(smallest) > 1 else None)
        if following is None or following >= test_t:  # the test split would be empty
            test_t = float(np.nextafter(following, 1)) if following is not None else test_t
    if summary["max"] < test_t:
        raise PrepareError(f"every one of the {summary['count']} distinct documents fell into a held-out split: "
                           f"lower data.val_fraction ({data.val_fraction}) or data.test_fraction "
                           f"({data.test_fraction}), or add documents")
    return val_t, test_t


def assign_splits(batch: dict, seed: int, val_t: float, test_t: float) -> dict:
    u = np.array([transforms.split_key(k, seed) for k in batch["cluster_key"]])
    batch["split"] = np.where(u < val_t, "val", np.where(u < test_t, "test", "train")).astype(object)
    return batch


def kept_documents(data_path: Location) -> Iterator[tuple[list[str], list[str], list[str]]]:
    """(doc keys, texts, cluster keys) of the kept documents of a prepared data folder, per documents shard."""
    data_path = as_location(data_path)
    for shard in documents_shards(data_path):
        table = read_kept(shard, data_path / "dedup")
        yield (table.column("doc_key").to_pylist(), table.column("text").to_pylist(),
               table.column("cluster_key").to_pylist())


def split_rule(data_path: Location, data: DataConfig) -> tuple[int, tuple[float, float]]:
    """(split seed, (val, val + test) thresholds) a prepared data folder was split with, from its manifest.
    data: the DataConfig it was prepared with (for folders prepared before the manifest recorded them)."""
    data_path = as_location(data_path)
    manifest = (data_path / "manifest.json").read_json()
    thresholds = manifest.get("split_thresholds")
    if thresholds is None:  # prepared before the manifest recorded them
        record = (data_path / "dedup" / "_stage.json").read_json()
        thresholds = (thresholds_from_summary(record["split_summary"], data) if "split_summary" in record
                      else split_thresholds(record["cluster_keys"], data))
    return manifest.get("split_seed", data.split_seed), tuple(thresholds)


def documents_shards(data_path: Location) -> list[Location]:
    """The documents shards of a prepared data folder, in corpus order."""
    data_path = as_location(data_path)
    return [data_path / "documents" / s for s in (data_path / "documents" / "_stage.json").read_json()["shards"]]


def shard_split(shard: Location, keep_dir: Location, split: str, seed: int,
                thresholds: tuple[float, float]) -> list[tuple[str, str]]:
    """(doc_key, text) of the kept documents of one documents shard that fall into split."""
    table = read_kept(shard, keep_dir)
    clusters = np.array(table.column("cluster_key").to_pylist(), dtype=object)
    splits = assign_splits({"cluster_key": clusters}, seed, *thresholds)["split"]
    return [(k, t) for k, t, s in zip(table.column("doc_key").to_pylist(), table.column("text").to_pylist(), splits)
            if s == split]


def split_documents(data_path: Location, data: DataConfig, split: str) -> Iterator[list[tuple[str, str]]]:
    """The kept documents of one split of a prepared data folder, as (doc_key, text) lists, one
    list per documents shard (plain pyarrow, no Ray). data: the DataConfig it was prepared with."""
    data_path = as_location(data_path)
    seed, thresholds = split_rule(data_path, data)
    for shard in documents_shards(data_path):
        yield shard_split(shard, data_path / "dedup", split, seed, thresholds)
