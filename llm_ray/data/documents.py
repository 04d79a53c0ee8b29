"""Stage 1 of prepare: read every file, clean, filter, hash and MinHash, one parquet shard per group of files."""

from __future__ import annotations

from collections import Counter

from llm_ray.config import CleaningConfig, Config, DataConfig, DedupConfig
from llm_ray.data import dedup, stages
from llm_ray.data.clean import clean_document
from llm_ray.data.errors import PrepareError
from llm_ray.data.pii import Redaction, example
from llm_ray.data.sources import FileRef, read_file
from llm_ray.data.stages import task_per_item
from llm_ray.storage import Location


def read_and_clean(uris: list[str], data: DataConfig, cleaning: CleaningConfig, dedup_cfg: DedupConfig,
                   out_path: str | Location) -> dict:
    """Read and clean a group of files into one parquet shard; return the group's statistics.

    The shard also holds each document's exact-duplicate hash and MinHash signature, so that
    the dedup stage reads a few bytes per document instead of every text again.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats = {"files": len(uris), "failed": [], "bytes_in": 0, "docs_in": 0, "docs_out": 0, "bytes_out": 0,
             "drops": Counter(), "notes": Counter(), "doc_chars": [], **pii_totals()}
    keys, texts = [], []
    for uri in uris:
        result = read_file(uri, data)
        stats["bytes_in"] += result.bytes_read
        stats["notes"].update(result.counts)
        if result.error:
            stats["failed"].append([uri, result.error])
            continue
        for key, text in result.docs:
            stats["docs_in"] += 1
            found = Redaction("")
            cleaned, reason = clean_document(text, cleaning, found)
            if found.counts:
                stats["pii"].update(found.counts)
                stats["pii_chars"] += found.chars
                stats["pii_docs"] += 1
                if len(stats["pii_examples"]) < cleaning.pii.examples:
                    stats["pii_examples"].append(example(found.text))
            if cleaned is None:
                stats["drops"][reason] += 1
                continue
            keys.append(key)
            texts.append(cleaned)
            stats["bytes_out"] += len(cleaned.encode("utf-8"))
            stats["doc_chars"].append(len(cleaned))
    stats["docs_out"] = len(keys)
    a, b = dedup.permutations(dedup_cfg.num_perm, dedup_cfg.seed)
    signatures = [dedup.minhash(dedup.shingle_hashes(t, dedup_cfg.shingle, dedup_cfg.ngram), a, b).tobytes()
                  for t in texts] if dedup_cfg.near else [b""] * len(texts)
    out = Location.parse(out_path, data.s3, "output_dir") if isinstance(out_path, str) else out_path
    schema = pa.schema([("doc_key", pa.string()), ("text", pa.string()), ("exact", pa.string()),
                        ("signature", pa.binary())])  # typed even when every document was dropped
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"doc_key": keys, "text": texts, "exact": [dedup.exact_hash(t) for t in texts],
                             "signature": signatures}, schema=schema), buffer)
    out.write_bytes(buffer.getvalue().to_pybytes())  # the shard appears whole or not at all
    out.with_suffix(".json").write_json(stats)  # the shard's completion marker
    return stats


def pii_totals() -> dict:
    """What redaction found: counts per kind, characters replaced, documents touched, redacted excerpts."""
    return {"pii": Counter(), "pii_chars": 0, "pii_docs": 0, "pii_examples": []}


def _read_clean_batch(batch: dict, data: dict, cleaning: dict, dedup_cfg: dict) -> dict:
    configs = DataConfig.model_validate(data), CleaningConfig.model_validate(cleaning)
    for uris, out in zip(batch["uris"], batch["out"]):
        read_and_clean(list(uris), *configs, DedupConfig.model_validate(dedup_cfg), str(out))
    return {"out": batch["out"]}


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


def documents_stage(cfg: Config, files: list[FileRef], out: Location, log) -> dict:

    key = stages.stage_key("documents", [f.fingerprint for f in files], cfg.data.text_field, cfg.data.txt_mode,
                           cfg.data.invalid_utf8, cfg.cleaning.model_dump(), signature_fields(cfg))
    if (record := stages.completed(out, key)) is not None:
        log("documents: up to date, skipped")
        return record
    stages.begin(out, key)
    groups = file_groups(files, cfg.data.files_per_task, cfg.data.mb_per_task)
    todo, shard_paths = [], []
    for group in groups:
        gid = stages.stage_key("group", key, [f.fingerprint for f in group])
        path = out / f"part-{gid}.parquet"
        shard_paths.append(path)
        if not path.with_suffix(".json").is_file():  # finished shards of an interrupted run are kept
            todo.append({"uris": [f.uri for f in group], "out": path.uri})
    log(f"documents: reading and cleaning {len(files)} files in {len(groups)} shards "
        f"({len(groups) - len(todo)} already done)")
    if todo:
        task_per_item(todo, _read_clean_batch, data=cfg.data.model_dump(), cleaning=cfg.cleaning.model_dump(),
                      dedup_cfg=cfg.dedup.model_dump()).materialize()
    totals = {"files": 0, "failed": [], "bytes_in": 0, "docs_in": 0, "docs_out": 0, "bytes_out": 0,
              "drops": Counter(), "notes": Counter(), "doc_chars": [], **pii_totals()}
    for path in shard_paths:
        stats = path.with_suffix(".json").read_json()
        for k in ("files", "bytes_in", "docs_in", "docs_out", "bytes_out", "pii_chars", "pii_docs"):
            totals[k] += stats[k]
        totals["pii"].update(stats["pii"])
        totals["pii_examples"] += stats["pii_examples"][:max(0, cfg.cleaning.pii.examples - len(totals["pii_examples"]))]
        totals["failed"] += stats["failed"]
        totals["drops"].update(stats["drops"])
        totals["notes"].update(stats["notes"])
        totals["doc_chars"] += stats["doc_chars"]
    if len(totals["failed"]) > cfg.data.max_failed_files:
        listing = "\n  ".join(f"{uri}: {why}" for uri, why in totals["failed"][:50])
        raise PrepareError(f"{len(totals['failed'])} files could not be read, more than data.max_failed_files "
                           f"({cfg.data.max_failed_files}):\n  {listing}")
    for uri, why in totals["failed"]:
        log(f"documents: skipped {uri}: {why}")
    return stages.finish(out, key, {"shards": [p.name for p in shard_paths], **totals})
