"""Stage 2 of prepare: exact and near-duplicate clusters over the whole corpus, as Ray tasks.

The driver holds nothing per document: it hands object references from one round of tasks to
the next and adds up counters, so its memory stays flat as the corpus grows. A document's id is
its position in corpus order (documents shards in order, rows in order).

  1. exact map, per documents shard: (normalized-text hash, id) rows, hash-partitioned.
  2. exact reduce, per partition: documents with one hash form an exact group; the first in
     corpus order represents it, the others are copies and take no further part.
  3. band map, per shard: the representatives' LSH band keys, (band key, id) rows partitioned by key.
  4. band reduce, per partition: each document sharing a band key (a bucket) is linked to the
     bucket's smallest id (star_edges), the edge sent on to the shard of that representative.
  5. verify, in two hops: an edge picks up its representative's signature and hash in that shard,
     then meets the member's in its own; it is confirmed when the signatures agree on at least
     dedup.threshold of their positions.
  6. components, one task over the confirmed edges only: connected components (scipy). A cluster's
     representative is its first document in corpus order, its key the smallest normalized-text
     hash among its documents (content only: the split assignment survives moving the corpus).
  7. keep lists, per shard: the rows kept with their cluster keys, and the shard's split summary.

Every step but the Ray calls is a plain function of numpy arrays (tested without Ray).
"""

from __future__ import annotations

import numpy as np

from llm_ray.data import dedup, stages, transforms
from llm_ray.data.errors import PrepareError
from llm_ray.data.stages import column, returns, submit, task
from llm_ray.memory import rss_bytes
from llm_ray.storage import Location

PAIR = np.int64  # ids


# ---------------------------------------------------------------- plain functions


def hash_words(hexes: list[str]) -> np.ndarray:
    """(n, 2) uint64 of 32-digit hex hashes; rows compare (lexicographically) as the strings do."""
    if not hexes:
        return np.zeros((0, 2), dtype=np.uint64)
    return np.frombuffer(bytes.fromhex("".join(hexes)), dtype=">u8").reshape(-1, 2).astype(np.uint64)


def hash_hex(word: np.ndarray) -> str:
    return f"{int(word[0]):016x}{int(word[1]):016x}"


def partition(rows: np.ndarray, keys: np.ndarray, parts: int) -> list[np.ndarray]:
    """rows split into parts by keys % parts (keys uint64)."""
    which = (keys % np.uint64(parts)).astype(np.int64)
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(1, parts))
    return np.split(rows[order], bounds)


def by_shard(rows: np.ndarray, ids: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """rows split by the shard of ids (offsets: first id of each shard, then the total)."""
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], offsets[1:-1])
    return np.split(rows[order], bounds)


def exact_groups(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows (n, 3) uint64 [hash hi, hash lo, id] -> (copies (k, 2) [copy id, representative id],
    sizes (g, 2) [representative id, group size] of the groups with copies)."""
    if len(rows) == 0:
        return np.zeros((0, 2), dtype=PAIR), np.zeros((0, 2), dtype=PAIR)
    rows = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]
    starts = np.flatnonzero(np.r_[True, np.any(rows[1:, :2] != rows[:-1, :2], axis=1)])
    sizes = np.diff(np.r_[starts, len(rows)])
    rep_of_row = np.repeat(rows[starts, 2], sizes).astype(PAIR)
    is_copy = np.ones(len(rows), dtype=bool)
    is_copy[starts] = False
    copies = np.stack([rows[is_copy, 2].astype(PAIR), rep_of_row[is_copy]], axis=1)
    multi = sizes > 1
    return copies, np.stack([rows[starts[multi], 2].astype(PAIR), sizes[multi]], axis=1)


def star_edges(rows: np.ndarray) -> np.ndarray:
    """rows (n, 2) uint64 [band key, id] -> unique edges (representative, member), representative < member:
    each document sharing a band key (a bucket) linked to the bucket's smallest id.

    Star edges, as datatrove's MinHash buckets: a bucket of k documents gives k - 1 edges, not the
    k (k - 1) / 2 pairs, so templated pages (thousands of documents in one bucket) cost linear time and
    memory. The components round makes the clusters transitive again.
    """
    if len(rows) < 2:
        return np.zeros((0, 2), dtype=PAIR)
    rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]  # by key, then id: a bucket's first row is its smallest id
    starts = np.flatnonzero(np.r_[True, rows[1:, 0] != rows[:-1, 0]])
    ids = rows[:, 1].astype(PAIR)
    representative = np.repeat(ids[starts], np.diff(np.r_[starts, len(rows)]))
    member = ids != representative
    return np.unique(np.stack([representative[member], ids[member]], axis=1), axis=0)


def signature_agreement(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """(e,) share of positions on which rows of two (e, num_perm) signature arrays agree: MinHash's
    estimate of the documents' Jaccard similarity."""
    return (sig_a == sig_b).mean(axis=1) if len(sig_a) else np.zeros(0)


def size_histogram(sizes: np.ndarray) -> list[list[int]]:
    """[lower bound, clusters] per power-of-two bin of cluster sizes >= 2: 2, 3-4, 5-8, 9-16, ... up to the
    bin of the largest cluster (empty bins included, so the bins line up between runs). At most
    log2(largest) + 1 rows, whatever the corpus."""
    sizes = np.asarray(sizes, dtype=np.int64)
    sizes = sizes[sizes >= 2]
    if len(sizes) == 0:
        return []
    bins = np.frexp((sizes - 1).astype(np.float64))[1]  # bit length of size - 1: 2 -> 1, 3..4 -> 2, 5..8 -> 3
    counts = np.bincount(bins)[1:]
    return [[2 ** k + 1, int(c)] for k, c in enumerate(counts)]


def components(edges: np.ndarray, node_hashes: np.ndarray, group_sizes: np.ndarray) -> dict:
    """Connected components of confirmed pairs.

    edges (e, 2) ids; node_hashes (m, 3) uint64 [id, hash hi, hash lo] covering every node;
    group_sizes (g, 2) [id, size] of exact groups with copies (a node absent there stands alone).
    Returns nodes (k,), their cluster's representative (smallest id) and key words (k, 2), and the
    component sizes in documents.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes = dedup.distinct(edges.ravel())
    if len(nodes) == 0:
        return {"nodes": nodes, "rep": nodes, "key": np.zeros((0, 2), dtype=np.uint64), "sizes": np.zeros(0, int)}
    a, b = np.searchsorted(nodes, edges[:, 0]), np.searchsorted(nodes, edges[:, 1])
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (a, b)), shape=(len(nodes), len(nodes)))
    count, label = connected_components(graph, directed=False)
    hashes = node_hashes[np.unique(node_hashes[:, 0], return_index=True)[1]]
    words = hashes[np.searchsorted(hashes[:, 0], nodes.astype(np.uint64)), 1:]
    rep = np.full(count, np.iinfo(PAIR).max, dtype=PAIR)
    np.minimum.at(rep, label, nodes)  # nodes are sorted: the smallest id of each component
    first = np.lexsort((words[:, 1], words[:, 0], label))  # by component, then hash
    starts = first[np.r_[True, label[first][1:] != label[first][:-1]]]
    key = np.zeros((count, 2), dtype=np.uint64)
    key[label[starts]] = words[starts]
    size_of = np.ones(len(nodes), dtype=np.int64)
    known = np.isin(nodes, group_sizes[:, 0])
    order = np.argsort(group_sizes[:, 0])
    size_of[known] = group_sizes[order][np.searchsorted(group_sizes[order, 0], nodes[known]), 1]
    sizes = np.bincount(label, weights=size_of, minlength=count).astype(np.int64)
    return {"nodes": nodes, "rep": rep[label], "key": key[label], "sizes": sizes}


def split_summary(cluster_keys: list[str], seed: int, val_fraction: float) -> dict:
    """What the split thresholds need from a set of cluster keys, mergeable across shards (see
    splits.thresholds_from_summary): count, the two smallest distinct split hashes, the smallest
    at or above val_fraction, and the largest."""
    u = dedup.distinct(np.array([transforms.split_key(k, seed) for k in cluster_keys], dtype=np.float64))
    above = u[u >= val_fraction]
    return {"count": len(cluster_keys), "smallest": u[:2].tolist(),
            "min_above_val": float(above[0]) if len(above) else None, "max": float(u[-1]) if len(u) else None}


def merge_summaries(parts: list[dict]) -> dict:
    present = [p for p in parts if p["count"]]
    above = [p["min_above_val"] for p in present if p["min_above_val"] is not None]
    return {"count": sum(p["count"] for p in parts),
            "smallest": sorted({u for p in present for u in p["smallest"]})[:2],
            "min_above_val": min(above) if above else None,
            "max": max((p["max"] for p in present), default=None)}


# ---------------------------------------------------------------- per-shard reading


def read_columns(shard: Location, columns: list[str]):
    import pyarrow.parquet as pq

    return pq.read_table(shard.open_input(), columns=columns)


def read_signatures(shard: Location, num_perm: int) -> np.ndarray:
    column = read_columns(shard, ["signature"]).column("signature").to_pylist()
    return np.frombuffer(b"".join(column), dtype=np.uint32).reshape(-1, num_perm)


def shard_hashes(shard: Location) -> np.ndarray:
    return hash_words(read_columns(shard, ["exact"]).column("exact").to_pylist())


# ---------------------------------------------------------------- Ray tasks (thin: read, call, return)


def _concat(chunks, width: int, dtype) -> np.ndarray:
    chunks = [c for c in chunks if len(c)]
    return np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=dtype)


def _exact_map(shard: Location, first: int, parts: int):
    words = shard_hashes(shard)
    ids = np.arange(first, first + len(words), dtype=np.uint64)
    return returns(partition(np.concatenate([words, ids[:, None]], axis=1), words[:, 0], parts))


def _exact_reduce(offsets: np.ndarray, *chunks):
    copies, sizes = exact_groups(_concat(chunks, 3, np.uint64))
    return returns(by_shard(copies, copies[:, 0], offsets) + [sizes])


def _band_map(shard: Location, first: int, parts: int, bands: int, rows: int, num_perm: int, *copies):
    sig = read_signatures(shard, num_perm)
    ids = np.arange(first, first + len(sig), dtype=np.uint64)
    mine = ~np.isin(ids.astype(PAIR), _concat(copies, 2, PAIR)[:, 0])  # exact copies take no part
    keys = dedup.band_keys(sig[mine], bands, rows)  # (m, bands)
    table = np.stack([keys.ravel(), np.repeat(ids[mine], bands)], axis=1)
    return returns(partition(table, table[:, 0], parts))


def _band_reduce(offsets: np.ndarray, *chunks):
    """The partition's star edges by the shard of their representative, then their count (a small stat)."""
    edges = star_edges(_concat(chunks, 2, np.uint64))
    return returns(by_shard(edges, edges[:, 0], offsets) + [len(edges)])


def _verify_attach(shard: Location, first: int, offsets: np.ndarray, num_perm: int, *chunks):
    pairs = np.unique(_concat(chunks, 2, PAIR), axis=0)  # an edge proposed in several partitions counts once
    sig, words = read_signatures(shard, num_perm), shard_hashes(shard)
    rows = pairs[:, 0] - first
    out = by_shard(np.arange(len(pairs)), pairs[:, 1], offsets)
    return returns([(pairs[i], words[rows[i]], sig[rows[i]]) for i in out])


def _verify_confirm(shard: Location, first: int, num_perm: int, threshold: float, *attached):
    sig, words = read_signatures(shard, num_perm), shard_hashes(shard)
    pairs = _concat([a[0] for a in attached], 2, PAIR)
    words_i = _concat([a[1] for a in attached], 2, np.uint64)
    sig_i = _concat([a[2] for a in attached], num_perm, np.uint32)
    rows = pairs[:, 1] - first
    # A member that fails against its bucket's representative gets no second chance (datatrove has
    # none either): a retry against the other members is the all-pairs cost again, for templated
    # buckets too. It loses its edge to a similar member only if a dissimilar document is the
    # smallest id of every bucket the two share; similar documents share several bands, dissimilar
    # ones few. On chains of overlapping windows (neighbours at Jaccard 0.6, ends at 0.33) that left
    # 2 of 600 documents outside clusters all pairs found. Star edges are a subset of the pairs, so
    # the error only ever keeps a near copy: it never merges documents all pairs keep apart.
    agreement = signature_agreement(sig_i, sig[rows])
    ok = agreement >= threshold
    hashes = np.concatenate([np.concatenate([pairs[ok, :1].astype(np.uint64), words_i[ok]], axis=1),
                             np.concatenate([pairs[ok, 1:].astype(np.uint64), words[rows[ok]]], axis=1)])
    return pairs[ok], hashes, agreement[ok]


def _components(offsets: np.ndarray, confirmed_count: int, *inputs):
    """inputs: the confirmed_count verify results, then the exact reducers' group sizes."""
    confirmed, group_sizes = inputs[:confirmed_count], _concat(inputs[confirmed_count:], 2, PAIR)
    edges = _concat([c[0] for c in confirmed], 2, PAIR)
    agreement = np.concatenate([c[2] for c in confirmed]) if confirmed else np.zeros(0)
    found = components(edges, _concat([c[1] for c in confirmed], 3, np.uint64), group_sizes)
    alone = group_sizes[~np.isin(group_sizes[:, 0], found["nodes"])]  # exact groups with no near copy
    order = np.lexsort((edges[:, 1], edges[:, 0]))[:5]
    cluster_sizes = np.concatenate([found["sizes"], alone[:, 1]])  # near-duplicate components, exact-only groups
    stats = {"near_pairs": len(edges), "clusters_with_copies": len(cluster_sizes),
             "largest": int(cluster_sizes.max(initial=1)), "histogram": size_histogram(cluster_sizes),
             "examples": [(int(edges[k, 0]), int(edges[k, 1]), round(float(agreement[k]), 3)) for k in order]}
    table = np.concatenate([found["nodes"][:, None].astype(np.uint64), found["rep"][:, None].astype(np.uint64),
                            found["key"]], axis=1)
    return returns(by_shard(table, found["nodes"], offsets) + [stats])


def _keep_list(shard: Location, first: int, out: Location, seed: int, val_fraction: float, clusters, *copies):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = read_columns(shard, ["doc_key", "exact", "bytes"])
    ids = np.arange(first, first + table.num_rows, dtype=PAIR)
    cluster_keys = np.array(table.column("exact").to_pylist(), dtype=object)
    copied = _concat(copies, 2, PAIR)[:, 0]
    member, rows = clusters[:, 0].astype(PAIR), clusters[:, 0].astype(PAIR) - first
    cluster_keys[rows] = [hash_hex(w) for w in clusters[:, 2:]]
    keep = ~np.isin(ids, copied)
    keep[rows[clusters[:, 1].astype(PAIR) != member]] = False  # in a cluster another document represents
    kept = np.flatnonzero(keep)
    schema = pa.schema([("row", pa.int64()), ("doc_key", pa.string()), ("cluster_key", pa.string())])
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"row": kept, "doc_key": table.column("doc_key").take(kept),
                             "cluster_key": cluster_keys[kept].tolist()}, schema=schema), buffer)
    (out / shard.name).write_bytes(buffer.getvalue().to_pybytes())
    sizes = table.column("bytes").to_numpy()
    return {"kept": len(kept), "copies": len(copied), "kept_bytes": int(sizes[kept].sum()),
            "copy_bytes": int(sizes[np.isin(ids, copied)].sum()),
            "split": split_summary(cluster_keys[kept].tolist(), seed, val_fraction)}


# ---------------------------------------------------------------- the stage


def cluster_shards(shards: list[Location], d, out: Location, seed: int, val_fraction: float) -> dict:
    """Run the rounds above over the documents shards; write one keep list per shard into out.

    d: the DedupConfig. Returns the counters. The rounds are submitted by one coordinating task
    rather than by the driver: Ray keeps small task results (under 100 KB) in the memory of the
    process that submitted the task, and the many small per-partition results of the middle
    rounds add up with the number of duplicate pairs; in the coordinator they never reach the
    driver, whose memory stays flat."""
    import ray

    return ray.get(task(_coordinate, num_cpus=0).remote(shards, d, out, seed, val_fraction))


def _coordinate(shards: list[Location], d, out: Location, seed: int, val_fraction: float) -> dict:
    """The rounds, submitted from a task (see cluster_shards)."""
    import pyarrow.parquet as pq
    import ray

    rss_before = rss_bytes()

    counts = [pq.read_metadata(s.open_input()).num_rows for s in shards]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(PAIR)
    firsts = [int(f) for f in offsets[:-1]]
    # Partitions: enough to spread each round over the cluster's CPUs. Every round's S x P results are
    # references the coordinator holds (and the small ones live in its memory), so no more than that.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    S, P = len(shards), max(1, min(len(shards), 4 * cpus, 256))
    copies = [[] for _ in range(S)]  # per shard: refs to (copy id, representative id) arrays
    sizes = []
    if d.exact:
        mapped = [submit(_exact_map, P, s, firsts[i], P) for i, s in enumerate(shards)]
        reduced = [submit(_exact_reduce, S + 1, offsets, *column(mapped, p)) for p in range(P)]
        copies = [column(reduced, i) for i in range(S)]
        sizes = column(reduced, S)
    confirmed, candidate_counts = [], []
    bands, rows = dedup.lsh_params(d.threshold, d.num_perm)
    if d.near:
        banded = [submit(_band_map, P, s, firsts[i], P, bands, rows, d.num_perm, *copies[i])
                  for i, s in enumerate(shards)]
        candidates = [submit(_band_reduce, S + 1, offsets, *column(banded, p)) for p in range(P)]
        candidate_counts = column(candidates, S)
        attached = [submit(_verify_attach, S, s, firsts[i], offsets, d.num_perm, *column(candidates, i))
                    for i, s in enumerate(shards)]
        confirmed = [submit(_verify_confirm, 1, s, firsts[i], d.num_perm, d.threshold, *column(attached, i))[0]
                     for i, s in enumerate(shards)]
    clustered = submit(_components, S + 1, offsets, len(confirmed), *confirmed, *sizes)
    stats = ray.get(clustered[S])
    kept = ray.get([submit(_keep_list, 1, s, firsts[i], out, seed, val_fraction, clustered[i], *copies[i])[0]
                    for i, s in enumerate(shards)])
    return {"docs_in": int(offsets[-1]), "docs_out": sum(k["kept"] for k in kept),
            "bytes_out": sum(k["kept_bytes"] for k in kept),  # UTF-8 bytes of the kept documents
            "exact_duplicates": sum(k["copies"] for k in kept),
            "exact_duplicate_bytes": sum(k["copy_bytes"] for k in kept),
            # The confirmed star edges (representative, member), not every similar pair: 2,000 templated
            # pages give about 11,500 (a few representatives per band), all pairs would be 2 million.
            "near_duplicate_pairs": stats["near_pairs"],
            # Before verification, summed over band partitions: an edge two partitions propose counts twice.
            "candidate_edges": sum(ray.get(candidate_counts)),
            "clusters_with_copies": stats["clusters_with_copies"], "largest_cluster": stats["largest"],
            "cluster_size_histogram": stats["histogram"],
            "lsh_bands": bands, "lsh_rows": rows, "examples": stats["examples"], "offsets": offsets,
            "split_summary": merge_summaries([k["split"] for k in kept]),
            "coordinator_growth_bytes": max(0, rss_bytes() - rss_before)}  # while holding every round's results


def dedup_key(cfg, documents_key: str) -> str:
    # The record's split summary depends on the split seed and validation share.
    return stages.stage_key("dedup", documents_key, cfg.dedup.model_dump(), cfg.data.split_seed, cfg.data.val_fraction)


def deduplicate(cfg, docs_dir: Location, docs_record: dict, out: Location, log) -> dict:
    """The documents' duplicate clusters, and per documents shard the rows kept (one per cluster) under out."""
    if docs_record["docs_out"] == 0:
        raise PrepareError("no documents survived cleaning: check data.sources and the cleaning.* thresholds "
                           f"(drops: {dict(docs_record['drops'])})")
    shards = [docs_dir / s for s in docs_record["shards"]]
    found = cluster_shards(shards, cfg.dedup, out, cfg.data.split_seed, cfg.data.val_fraction)
    examples = []
    for i, j, agreement in found.pop("examples"):  # document keys of the few example pairs
        keys = [document_key(shards, found["offsets"], x) for x in (i, j)]
        examples.append({"documents": keys, "estimated_jaccard": agreement})
    del found["offsets"], found["coordinator_growth_bytes"]
    log(f"dedup: {found['docs_in']} documents -> {found['docs_out']} kept; {found['exact_duplicates']} exact copies "
        f"and {found['near_duplicate_pairs']} near-duplicate edges (of {found['candidate_edges']} candidates); "
        f"{found['clusters_with_copies']} clusters with "
        f"copies (LSH {found['lsh_bands']} bands x {found['lsh_rows']} rows)")
    return {**found, "example_pairs": examples}


def document_key(shards: list[Location], offsets: np.ndarray, doc_id: int) -> str:
    s = int(np.searchsorted(offsets, doc_id, side="right") - 1)
    return read_columns(shards[s], ["doc_key"]).column("doc_key")[doc_id - int(offsets[s])].as_py()
