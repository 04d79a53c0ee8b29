"""Stage 1 of prepare: stream every file, clean, filter, hash and MinHash into parquet shards.

Files are taken in groups (data.files_per_task files, or CHUNKS_PER_GROUP x data.mb_per_task MB as
stored; a larger file is a group alone). A reader task per group streams its documents (``sources.iter_documents``)
and cuts them into chunks of about data.mb_per_task MB of text; each chunk is cleaned by a task of
its own, which writes one documents shard. So one 15 GB ``.jsonl.zst`` keeps every core busy, and
no task holds more than a chunk, whatever the size of its file. A reader keeps at most as many
chunks in flight as the cluster has CPUs; the driver runs two readers at a time and receives only
each group's totals (``doc_stats``), never a record per document.

A shard holds each document's key, text, UTF-8 size, exact-duplicate hash and MinHash signature,
so that the dedup stage reads a few bytes per document instead of every text again. A shard's
``.json`` beside it is its completion marker, and a group's ``group-<id>.json`` lists its shards:
an interrupted run redoes only the chunks that were not finished.
"""

from __future__ import annotations

import time
from collections import Counter

from llm_ray.config import CleaningConfig, Config, DataConfig, DedupConfig
from llm_ray.data import dedup, doc_stats, stages
from llm_ray.data.clean import clean_document
from llm_ray.data.decontaminate import Screens, build_screens
from llm_ray.data.errors import PrepareError
from llm_ray.data.pii import Redaction, example
from llm_ray.data.sources import FileRef, ReadError, iter_documents
from llm_ray.memory import private_rss_bytes, reset_peak_rss
from llm_ray.storage import Location

READERS_IN_FLIGHT = 2  # at least: one streams while the other waits for its last chunks
# A group of files holds about this many chunks' worth of files as stored, so that the partial last
# chunk of each group is rare (groups of one chunk's worth gave 100 files of 10 MB 200 shards).
CHUNKS_PER_GROUP = 8


# ---------------------------------------------------------------- one chunk (plain: tested without Ray)


def clean_chunk(docs: list[tuple[str, str]], cleaning: CleaningConfig, dedup_cfg: DedupConfig, screens: Screens,
                out: Location) -> dict:
    """Clean, filter, hash and MinHash a chunk of (doc_key, text); write its shard and marker at out
    (a .parquet Location); return the chunk's statistics."""
    started = time.time()
    stats = doc_stats.new_stats()
    keys, texts, sizes = [], [], []
    for key, text in docs:
        size = len(text.encode("utf-8"))
        stats["docs_in"] += 1
        stats["text_bytes_in"] += size
        cleaned, reason = _clean_one(key, text, cleaning, screens, stats)
        if cleaned is None:
            stats["drops"][reason] += 1
            stats["drop_bytes"][reason] += size
            continue
        keys.append(key)
        texts.append(cleaned)
        sizes.append(len(cleaned.encode("utf-8")))
        stats["length_histogram"][doc_stats.length_bin(len(cleaned))] += 1
    stats["docs_out"], stats["bytes_out"] = len(keys), sum(sizes)
    _write_shard(out, keys, texts, sizes, dedup_cfg)
    stats["chunks"]["cleaned"] += 1
    # The shard's completion marker; "ran" (wall-clock span) is not a total, for tests and benchmarks only.
    out.with_suffix(".json").write_json({**stats, "ran": [started, time.time()],
                                          "keys": [docs[0][0], docs[-1][0]] if docs else []})
    return stats


def _clean_one(key: str, text: str, cleaning: CleaningConfig, screens: Screens, stats: dict):
    """(cleaned text, None) or (None, drop reason): the cleaning rules, then language, then contamination."""
    found = Redaction("")
    cleaned, reason = clean_document(text, cleaning, found)
    if found.counts:
        stats["pii"].update(found.counts)
        stats["pii_chars"] += found.chars
        stats["pii_docs"] += 1
        if len(stats["pii_examples"]) < cleaning.pii.examples:
            stats["pii_examples"].append(example(found.text))
    if cleaned is None:
        return None, reason
    return screens.check(key, cleaned, stats)


def _write_shard(out: Location, keys: list[str], texts: list[str], sizes: list[int], d: DedupConfig) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    a, b = dedup.permutations(d.num_perm, d.seed)
    signatures = [dedup.minhash(dedup.shingle_hashes(t, d.shingle, d.ngram), a, b).tobytes()
                  for t in texts] if d.near else [b""] * len(texts)
    schema = pa.schema([("doc_key", pa.string()), ("text", pa.string()), ("bytes", pa.int64()),
                        ("exact", pa.string()), ("signature", pa.binary())])  # typed even when empty
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"doc_key": keys, "text": texts, "bytes": sizes,
                             "exact": [dedup.exact_hash(t) for t in texts], "signature": signatures},
                            schema=schema), buffer)
    out.write_bytes(buffer.getvalue().to_pybytes())  # the shard appears whole or not at all


# ---------------------------------------------------------------- a group of files (a Ray task)


def read_group(files: list[tuple[str, int]], gid: str, cfg_parts: dict, out: Location, in_flight: int,
               screens_box: list) -> dict:
    """Stream a group's files into chunks, clean each chunk in a task of its own, write the group's
    marker; return the group's totals. files: (uri, size as stored); screens_box: [a reference to
    the Screens] (in a list, so that Ray hands this task the reference, not the value)."""
    import ray

    reset_peak_rss()
    start_bytes = private_rss_bytes()
    data = DataConfig.model_validate(cfg_parts["data"])
    cleaning = cfg_parts["cleaning"]
    chunk_chars = int(data.mb_per_task * 1e6)
    totals, shards, pending = doc_stats.new_stats(), [], []
    chunk, chars = [], 0

    def flush() -> None:
        nonlocal chunk, chars, pending
        shard = out / f"part-{gid}-{len(shards):05d}.parquet"
        shards.append(shard.name)
        finished = _finished_chunk(shard, chunk)
        if finished is not None:  # by an interrupted run, from the same documents
            doc_stats.merge(totals, {**finished, "chunks": {"reused": 1}}, _examples(cleaning))
        else:
            pending.append(stages.task(clean_chunk_task).remote(chunk, cfg_parts, screens_box[0], shard))
        while len(pending) >= in_flight:  # bounded: the reader never runs far ahead of the cleaners
            ready, pending = ray.wait(pending, num_returns=1)
            doc_stats.merge(totals, ray.get(ready[0]), _examples(cleaning))
        chunk, chars = [], 0

    for uri, size in files:
        counts = Counter()
        totals["files"] += 1
        totals["bytes_in"] += size
        try:
            for doc in iter_documents(uri, data, counts):
                chunk.append(doc)
                chars += len(doc[1])
                if chars >= chunk_chars:
                    flush()
        except ReadError as e:  # the documents before the failure are kept
            totals["failed"].append([uri, str(e)])
        totals["notes"].update(counts)
    if chunk:
        flush()
    for stats in ray.get(pending):
        doc_stats.merge(totals, stats, _examples(cleaning))
    doc_stats.merge(totals, doc_stats.task_memory("read_group", start_bytes), 0)
    (out / f"group-{gid}.json").write_json({"shards": shards, **totals})
    return {"shards": shards, **totals}


def _finished_chunk(shard: Location, chunk: list[tuple[str, str]]) -> dict | None:
    """The record of shard when an earlier run finished it from exactly these documents (its first and
    last keys and its count): a file that broke mid-stream then, or reads differently now, shifts the
    chunks after it, and their old shards must not be taken for the new ones."""
    marker = shard.with_suffix(".json")
    if not marker.is_file():
        return None
    record = marker.read_json()
    same = record.get("keys") == [chunk[0][0], chunk[-1][0]] and record.get("docs_in") == len(chunk)
    return record if same else None


def _examples(cleaning: dict) -> int:
    return cleaning["pii"]["examples"]


def clean_chunk_task(docs: list, cfg_parts: dict, screens: Screens, out: Location) -> dict:
    """clean_chunk in a Ray task; its record also holds the task's peak memory (from the moment its
    arguments, the chunk, were in memory)."""
    reset_peak_rss()
    start_bytes = private_rss_bytes()
    stats = clean_chunk(docs, CleaningConfig.model_validate(cfg_parts["cleaning"]),
                        DedupConfig.model_validate(cfg_parts["dedup"]), screens, out)
    return doc_stats.merge(stats, doc_stats.task_memory("clean_chunk", start_bytes), 0)


# ---------------------------------------------------------------- the stage (driver)


def signature_fields(cfg: Config) -> dict:
    """The dedup settings the documents stage's signatures depend on (none without near dedup)."""
    if not cfg.dedup.near:
        return {"near": False}
    return cfg.dedup.model_dump(include={"near", "shingle", "ngram", "num_perm", "seed"})


def file_groups(files: list[FileRef], max_files: int, max_mb: float) -> list[list[FileRef]]:
    """Consecutive files, a group closing at max_files files or max_mb MB (a bigger file is a group alone)."""
    groups: list[list[FileRef]] = [[]]
    size = 0
    for f in files:
        if groups[-1] and (len(groups[-1]) >= max_files or size + f.size > max_mb * 1e6):
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += f.size
    return groups if groups[0] else []


def _group_done(marker: Location) -> bool:
    """A group an earlier run finished with every file read whole (one with failed files is read again:
    the failure may have been transient)."""
    return marker.is_file() and not marker.read_json()["failed"]


def documents_key(cfg: Config, files: list[FileRef], eval_sets: list[FileRef]) -> str:
    return stages.stage_key("documents", [f.fingerprint for f in files], cfg.data.text_field, cfg.data.txt_mode,
                            cfg.data.invalid_utf8, cfg.data.max_document_mb, cfg.data.mb_per_task,
                            cfg.cleaning.model_dump(), signature_fields(cfg), [f.fingerprint for f in eval_sets],
                            cfg.data.decontaminate_threshold)


def clean_documents(cfg: Config, files: list[FileRef], eval_sets: list[FileRef], out: Location, key: str,
                    log) -> dict:
    """Every file read, cleaned, screened and hashed into documents shards under out, group by group
    (a group finished by an earlier run with the same key is reused); the totals and the shards."""
    import ray

    groups = file_groups(files, cfg.data.files_per_task, cfg.data.mb_per_task * CHUNKS_PER_GROUP)
    gids = [stages.stage_key("group", key, [f.fingerprint for f in g]) for g in groups]
    todo = {i for i, gid in enumerate(gids) if not _group_done(out / f"group-{gid}.json")}
    log(f"documents: streaming {len(files)} files in {len(groups)} groups ({len(groups) - len(todo)} already done)")
    screens_ref = build_screens(cfg, eval_sets, log) if todo else None
    cfg_parts = {"data": cfg.data.model_dump(), "cleaning": cfg.cleaning.model_dump(), "dedup": cfg.dedup.model_dump()}
    cpus = int(ray.cluster_resources().get("CPU", 1)) if todo else 0
    in_flight = max(2, cpus)  # chunks a reader keeps in flight
    readers = max(READERS_IN_FLIGHT, cpus // 16)  # a big cluster reads several groups at once
    running = {}
    for i in sorted(todo):
        # Each reader runs in a worker process of its own, which ends with it (max_calls=1; the env var
        # gives readers a worker pool apart from the cleaners'): a reader lives as long as its group
        # (minutes), so the start-up is cheap, and its recorded peak is its own, not its process's past.
        running[stages.task(read_group, num_cpus=0, max_calls=1,
                            runtime_env={"env_vars": {"LLM_RAY_TASK": "read_group"}}).remote(
            [(f.uri, f.size) for f in groups[i]], gids[i], cfg_parts, out, in_flight, [screens_ref])] = i
        while len(running) >= readers or (i == max(todo) and running):
            done, _ = ray.wait(list(running), num_returns=1)
            stages.result(done[0])  # a reader's failure raised here, as the user's error it is
            del running[done[0]]
    totals, shards = doc_stats.new_stats(), []
    for i, gid in enumerate(gids):  # in corpus order: a document's id in dedup is its position
        group = (out / f"group-{gid}.json").read_json()
        if i not in todo:  # finished by an earlier run: its chunks were reused, not cleaned now
            group["chunks"] = {"reused": len(group["shards"])}
        shards += group.pop("shards")
        doc_stats.merge(totals, group, cfg.cleaning.pii.examples)
    if len(totals["failed"]) > cfg.data.max_failed_files:
        listing = "\n  ".join(f"{uri}: {why}" for uri, why in totals["failed"][:50])
        raise PrepareError(f"{len(totals['failed'])} files could not be read, more than data.max_failed_files "
                           f"({cfg.data.max_failed_files}):\n  {listing}")
    for uri, why in totals["failed"]:
        log(f"documents: skipped {uri}: {why}")
    log(f"documents: {totals['docs_in']:,} documents in {len(shards)} shards ({totals['chunks'].get('cleaned', 0)} "
        f"cleaned now, {totals['chunks'].get('reused', 0)} reused); {totals['docs_out']:,} kept")
    return {"shards": shards, **totals}
