"""Throughput, peak memory and near-dedup quality of `llm-ray prepare`.

    python benchmarks/prepare_throughput.py [--sizes-mb 50 200] [--skip-demo]
    python benchmarks/prepare_throughput.py --pii [DOCUMENTS]   # redaction: throughput ratio, precision/recall

(a) the demo corpus (builtin:shakespeare); (b) generated corpora of the given sizes:
documents stitched from random Shakespeare paragraphs (distinct from each other), with
5% of them copied with a planted near-duplicate change (3% of words edited, re-wrapped,
or a new header). Prints per-stage MB/s per core, whole-prepare MB/s per core, peak
resident memory of the driver and every Ray process, and near-dedup precision/recall on
the planted pairs.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from llm_ray.config import load_config
from llm_ray.data.corpus import shakespeare_dir
from llm_ray.data.prepare import data_dir, prepare
from llm_ray.ray_utils import init_ray


class PeakMemory:
    """Peak of the summed RSS of this process and all its descendants (Ray's processes included), or
    of this process alone (children=False)."""

    def __init__(self, interval_s: float = 0.25, children: bool = True):
        self.peak, self.children = 0, children
        self.parts: dict[str, tuple[int, int]] = {}  # process name -> (processes, summed RSS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _processes(self) -> list:
        me = psutil.Process()
        return [me, *me.children(recursive=True)] if self.children else [me]

    def _measure(self, p) -> tuple[str, int]:
        """(name, RSS) of process p; raises psutil.Error or OSError when it has exited."""
        rss = p.memory_info().rss
        return ("driver" if p.pid == os.getpid() else " ".join(p.cmdline()[:1]).split("/")[-1][:40]), rss

    def _run(self, interval_s):
        while not self._stop.is_set():
            total, parts = 0, {}
            try:
                processes = self._processes()
            except psutil.Error:  # the process sampled has exited
                processes = []
            for p in processes:
                try:
                    name, rss = self._measure(p)
                except (OSError, psutil.Error):  # the process has exited
                    continue
                total += rss
                count, size = parts.get(name, (0, 0))
                parts[name] = (count + 1, size + rss)
            if total > self.peak:
                self.peak, self.parts = total, parts
            time.sleep(interval_s)

    def breakdown(self, top: int = 5) -> str:
        """The largest process groups at the peak, e.g. 'ray::IDLE x2 0.8'."""
        largest = sorted(self.parts.items(), key=lambda kv: -kv[1][1])[:top]
        return ", ".join(f"{name} x{n} {rss / 2**30:.2f}" for name, (n, rss) in largest)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def edit_words(text: str, fraction: float, rng: random.Random) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * fraction))):
        words[i] = words[i][::-1] + "x"
    return " ".join(words)


def rewrap(text: str, width: int, rng: random.Random) -> str:
    out, line = [], ""
    for w in text.split():
        if len(line) + len(w) > width:
            out.append(line)
            line = ""
        line = (line + " " + w).strip()
    return "\n".join(out + [line])


def generate_corpus(target: Path, size_mb: int, seed: int = 0) -> list[tuple[str, str]]:
    """Write ~size_mb of .txt documents; return the planted (original, copy) file-name pairs."""
    rng = random.Random(seed)
    paragraphs = []
    for path in sorted(shakespeare_dir().glob("*.txt")):
        paragraphs += [p.strip() for p in re.split(r"\n\s*\n", path.read_text(errors="replace")) if len(p) > 200]
    target.mkdir(parents=True)
    written, i, planted = 0, 0, []
    while written < size_mb * 1_000_000:
        doc = "\n\n".join(rng.sample(paragraphs, 24))
        name = f"doc{i:07d}.txt"
        (target / name).write_text(doc)
        written += len(doc)
        if rng.random() < 0.05:
            kind = rng.choice(["edit", "rewrap", "header"])
            copy = {"edit": lambda: edit_words(doc, 0.03, rng),
                    "rewrap": lambda: rewrap(doc, rng.randint(40, 90), rng),
                    "header": lambda: f"Reprinted edition {rng.randint(1, 999)}, with notes.\n\n" + doc}[kind]()
            copy_name = f"doc{i:07d}_copy_{kind}.txt"
            (target / copy_name).write_text(copy)
            written += len(copy)
            planted.append((name, copy_name))
        i += 1
    return planted


def near_dedup_quality(cfg, planted: list[tuple[str, str]]) -> tuple[float, float]:
    """Recall: planted copies merged with their original. Precision: dropped docs that were planted copies."""
    import pyarrow.parquet as pq

    kept = {Path(r["doc_key"]).name: Path(r["cluster_key"]).name
            for r in pq.read_table(data_dir(cfg).local() / "dedup", columns=["doc_key", "cluster_key"]).to_pylist()}
    shards = sorted(str(p) for p in (data_dir(cfg).local() / "documents").glob("part-*.parquet"))
    docs = [Path(r["doc_key"]).name for r in pq.ParquetDataset(shards).read(columns=["doc_key"]).to_pylist()]
    dropped = [d for d in docs if d not in kept]
    planted_copies = {c for _, c in planted}
    original_of = {c: o for o, c in planted}
    # A planted pair is found when exactly one of the two survives.
    found = sum((o in kept) != (c in kept) for o, c in planted)
    recall = found / max(1, len(planted))
    true_drops = sum(d in planted_copies or d in original_of.values() for d in dropped)
    precision = true_drops / max(1, len(dropped))
    return precision, recall


def run(label: str, sources: list[str], workdir: Path, cores: int, planted=None):
    cfg = load_config("demo", [f"output_dir={workdir}", f"name={label}", f"data.sources={sources!r}".replace("'", '"')])
    timings = {}

    def log(line):
        print("   ", line)

    with PeakMemory() as mem:
        started = time.time()
        manifest = prepare(cfg, log=log)
        total = time.time() - started
    import json

    report = json.loads((data_dir(cfg).local() / "prepare_report.json").read_text())
    timings = report["timings_seconds"]
    mb = manifest["bytes"] / 1e6
    print(f"\n== {label}: {mb:.1f} MB, {manifest['files']} files, {cores} cores")
    for stage, seconds in timings.items():
        print(f"   {stage:<10} {seconds:7.1f} s   {mb / max(seconds, 1e-9) / cores:7.2f} MB/s per core")
    print(f"   {'prepare':<10} {total:7.1f} s   {mb / total / cores:7.2f} MB/s per core   "
          f"peak memory {mem.peak / 2**30:.2f} GiB")
    print(f"   at the peak (GiB): {mem.breakdown()}")
    if planted is not None:
        precision, recall = near_dedup_quality(cfg, planted)
        print(f"   near-dedup on {len(planted)} planted pairs: precision {precision:.3f}, recall {recall:.3f}")
    return total


# ---------------------------------------------------------------- dedup alone, on synthetic signatures

NUM_PERM = 128
NEAR_SHARE, EXACT_SHARE, DECOY_SHARE = 0.10, 0.02, 0.02  # planted near copies, exact copies, look-alikes


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a well-spread uint64 hash of uint64 inputs (vectorized)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def planted(ids: np.ndarray, shard_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(kind, origin) of each document id: 0 original, 1 near copy, 2 exact copy, 3 look-alike (shares
    30% of an original's signature: not a duplicate). Even ids are always originals; a copy or
    look-alike points to an even id one to three shards earlier, so clusters cross shards."""
    u = (mix(ids * np.uint64(7) + np.uint64(1)) >> np.uint64(11)).astype(np.float64) / 2**53
    kind = np.select([u < NEAR_SHARE, u < NEAR_SHARE + EXACT_SHARE, u < NEAR_SHARE + EXACT_SHARE + DECOY_SHARE],
                     [1, 2, 3], 0)
    offset = np.uint64(shard_size) * (np.uint64(1) + mix(ids) % np.uint64(3)) + mix(ids + np.uint64(5)) % np.uint64(97)
    reachable = ids >= offset
    back = np.where(reachable, ids - np.where(reachable, offset, 0), 0)
    back -= back % np.uint64(2)
    kind = np.where(reachable & (ids % np.uint64(2) == 1), kind, 0)
    return kind, np.where(kind > 0, back, ids).astype(np.int64)


def synthetic_shard(first: int, count: int, shard_size: int, path: str) -> int:
    """Write documents [first, first + count) as a documents shard (doc_key, exact, signature)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = np.arange(first, first + count, dtype=np.uint64)
    kind, origin = planted(ids, shard_size)
    base = origin.astype(np.uint64)
    positions = np.arange(NUM_PERM, dtype=np.uint64)
    sig = mix(base[:, None] * np.uint64(NUM_PERM) + positions)  # the origin's signature
    own = mix(ids[:, None] * np.uint64(NUM_PERM) + positions + np.uint64(1 << 40))
    share = (mix(ids[:, None] * np.uint64(31) + positions) >> np.uint64(11)).astype(np.float64) / 2**53
    changed = np.where(kind[:, None] == 1, share < 0.05 + 0.25 * (share[:, :1]), False)  # 5-30% of positions
    changed |= (kind[:, None] == 3) & (share >= 0.3)  # look-alikes keep only 30%
    sig = np.where(changed, own, sig).astype(np.uint32)
    exact_of = np.where(kind == 2, base, ids)  # exact copies share the origin's text hash
    exact = [f"{a:016x}{b:016x}" for a, b in zip(mix(exact_of).tolist(), mix(exact_of + np.uint64(1)).tolist())]
    table = pa.table({"doc_key": [f"doc{i:09d}" for i in ids.tolist()], "exact": exact,
                      "bytes": pa.array(np.full(len(exact), 2000, dtype=np.int64)),  # a stand-in size
                      "signature": pa.array([r.tobytes() for r in sig], type=pa.binary())})
    pq.write_table(table, path)
    return count


def dedup_quality(shard_path: str, keep_path: str, first: int, shard_size: int) -> tuple[int, int, int]:
    """(dropped planted copies, dropped documents, planted copies) of one shard."""
    import pyarrow.parquet as pq

    count = pq.read_metadata(shard_path).num_rows
    kind, _ = planted(np.arange(first, first + count, dtype=np.uint64), shard_size)
    kept = np.zeros(count, dtype=bool)
    kept[pq.read_table(keep_path, columns=["row"]).column("row").to_numpy()] = True
    copy = (kind == 1) | (kind == 2)
    return int((~kept & copy).sum()), int((~kept).sum()), int(copy.sum())


def former_clustering(paths: list[str]) -> dict:
    """The baseline: the former dedup stage's clustering, every hash and signature read onto the driver
    (this process plays the driver)."""
    import pyarrow.parquet as pq

    from llm_ray.config import DedupConfig
    from llm_ray.data import dedup

    d = DedupConfig()
    before = psutil.Process().memory_info().rss
    with PeakMemory(0.05, children=False) as peak:
        started = time.time()
        tables = [pq.read_table(p, columns=["exact", "signature"]) for p in paths]
        exact = np.array([h for t in tables for h in t.column("exact").to_pylist()], dtype=object)
        sig = np.frombuffer(b"".join(b for t in tables for b in t.column("signature").to_pylist()),
                            dtype=np.uint32).reshape(-1, d.num_perm)
        del tables
        first, pairs = {}, []
        for i, h in enumerate(exact):
            pairs.append((first[h], i)) if h in first else first.setdefault(h, i)
        bands, rows = dedup.lsh_params(d.threshold, d.num_perm)
        labels = dedup.clusters(len(exact), pairs + dedup.near_duplicate_pairs(sig, d.threshold, bands, rows))
        seconds = time.time() - started
    return {"seconds": seconds, "driver_peak": peak.peak, "driver_before": before, "kept": int((labels == np.arange(
        len(labels))).sum())}


def dedup_only(documents: int, workdir: Path, shard_size: int = 100_000, baseline: bool = False) -> dict:
    """The dedup stage's clustering alone on synthetic signatures with planted clusters."""
    import ray

    from llm_ray.config import DedupConfig
    from llm_ray.data.dedup_stage import cluster_shards
    from llm_ray.storage import Location

    folder = workdir / f"dedup-{documents}"
    (folder / "documents").mkdir(parents=True)
    (folder / "dedup").mkdir()
    starts = list(range(0, documents, shard_size))
    paths = [str(folder / "documents" / f"part-{i:05d}.parquet") for i in range(len(starts))]
    write = ray.remote(synthetic_shard)
    ray.get([write.remote(s, min(shard_size, documents - s), shard_size, p) for s, p in zip(starts, paths)])
    shards = [Location(p) for p in paths]
    before = psutil.Process().memory_info().rss
    with PeakMemory(0.05, children=False) as peak:
        started = time.time()
        found = cluster_shards(shards, DedupConfig(), Location(str(folder / "dedup")), seed=0, val_fraction=0.05)
        seconds = time.time() - started
    former = None
    if baseline:  # in a process of its own, so that its memory is not this driver's
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            former = pool.submit(former_clustering, paths).result()
    score = ray.remote(dedup_quality)
    parts = ray.get([score.remote(p, str(folder / "dedup" / Path(p).name), s, shard_size)
                     for s, p in zip(starts, paths)])
    true_drops, drops, planted_copies = (sum(x) for x in zip(*parts))
    shutil.rmtree(folder, ignore_errors=True)
    return {"documents": documents, "seconds": seconds, "driver_before": before, "driver_peak": peak.peak,
            "precision": true_drops / max(1, drops), "recall": true_drops / max(1, planted_copies),
            "clusters": found["clusters_with_copies"], "near_pairs": found["near_duplicate_pairs"],
            "kept": found["docs_out"], "former": former, "coordinator": found["coordinator_growth_bytes"]}


def print_dedup_only(sizes: list[int], workdir: Path) -> None:
    print(f"\ndedup alone on synthetic signatures ({NUM_PERM} permutations; planted: {NEAR_SHARE:.0%} near copies "
          f"with 5-30% of positions changed, {EXACT_SHARE:.0%} exact copies, {DECOY_SHARE:.0%} look-alikes sharing "
          "30%), the driver's memory sampled every 50 ms:")
    first = None
    for n in sizes:
        r = dedup_only(n, workdir, baseline=first is None)
        first = first or r
        growth = (r["driver_peak"] - r["driver_before"]) / 2**20
        print(f"  {n:>10,} documents: {r['seconds']:6.1f} s ({r['seconds'] / first['seconds']:.2f}x the first size's "
              f"time for {n / first['documents']:.0f}x the documents) | driver peak {r['driver_peak'] / 2**30:.2f} GiB "
              f"({r['driver_peak'] / first['driver_peak']:.2f}x the first size's; +{growth:.0f} MiB during dedup) | "
              f"coordinator task +{r['coordinator'] / 2**20:.0f} MiB | "
              f"precision {r['precision']:.4f}, recall {r['recall']:.4f} | {r['clusters']:,} clusters, "
              f"{r['near_pairs']:,} near pairs")
        if r["former"]:
            f = r["former"]
            print(f"  {n:>10,} documents, the former clustering on the driver (baseline): {f['seconds']:6.1f} s, driver "
                  f"peak {f['driver_peak'] / 2**30:.2f} GiB (+{(f['driver_peak'] - f['driver_before']) / 2**20:.0f} MiB "
                  "in a process of its own); "
                  f"distributed: {r['seconds'] / f['seconds']:.2f}x its time, "
                  f"{(r['driver_peak'] - r['driver_before']) / max(1, f['driver_peak'] - f['driver_before']):.3f}x its "
                  f"driver growth; documents kept: {r['kept']:,} vs {f['kept']:,}")


def pii_benchmark(workdir: Path, documents: int, rounds: int = 3) -> None:
    """The documents stage's work (read, clean, MinHash, write a shard) on one core, with and without
    cleaning.pii, alternated `rounds` times on the same generated files; then redaction's precision and
    recall on the planted items (benchmarks/_pii_set.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _pii_set import generated_set, precision_recall

    from collections import Counter

    from llm_ray.data.decontaminate import Screens
    from llm_ray.data.documents import clean_chunk
    from llm_ray.data.sources import iter_documents
    from llm_ray.storage import Location

    def read_and_clean(uris, data, cleaning, dedup_cfg, out):  # what a reader and a cleaning task do, in one
        docs = [doc for uri in uris for doc in iter_documents(uri, data, Counter())]
        return clean_chunk(docs, cleaning, dedup_cfg, Screens(), Location.parse(out))

    paragraphs = []
    for path in sorted(shakespeare_dir().glob("*.txt")):
        paragraphs += [p.strip() for p in re.split(r"\n\s*\n", path.read_text(errors="replace")) if len(p) > 200]
    docs = generated_set(paragraphs, documents)
    folder = workdir / "pii"
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i, (text, _) in enumerate(docs):
        (folder / f"doc{i:05d}.txt").write_text(text)
        uris.append(str(folder / f"doc{i:05d}.txt"))
    mb = sum(len(t.encode()) for t, _ in docs) / 1e6
    base = load_config("demo", [])
    variants = {"without": base.cleaning.model_copy(update={"pii": base.cleaning.pii.model_copy(update={"enabled": False})}),
                "with": base.cleaning}
    seconds = {k: [] for k in variants}
    for r in range(rounds):
        for label, cleaning in variants.items():
            started = time.perf_counter()
            read_and_clean(uris, base.data, cleaning, base.dedup, str(workdir / f"pii-{label}-{r}.parquet"))
            seconds[label].append(time.perf_counter() - started)
    rate = {k: mb / min(v) for k, v in seconds.items()}
    print(f"\nredaction in the documents stage: {documents} documents, {mb:.1f} MB, one core, best of {rounds}")
    for label in variants:
        print(f"   {label + ' redaction':<18} {rate[label]:6.2f} MB/s per core")
    print(f"   with / without: {rate['with'] / rate['without']:.3f}x throughput "
          f"({(1 - rate['with'] / rate['without']) * 100:+.1f}% slower; target at most 15%)")
    precision, recall, planted = precision_recall(docs)
    print(f"   on {planted['all']} planted items: " + ", ".join(
        f"{k} P {precision[k]:.3f} R {recall[k]:.3f} (n={planted[k]})" for k in planted))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 200], help="generated corpus sizes")
    parser.add_argument("--skip-demo", action="store_true", help="skip the demo corpus")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed after)")
    parser.add_argument("--dedup-only", type=int, nargs="+", metavar="DOCUMENTS",
                        help="only the dedup stage, on synthetic signatures of these corpus sizes (e.g. 1000000 5000000)")
    parser.add_argument("--pii", type=int, nargs="?", const=400, metavar="DOCUMENTS",
                        help="only redaction: documents stage MB/s per core with and without it, precision/recall")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llmray-bench-"))
    if args.pii:
        try:
            pii_benchmark(workdir, args.pii)
        finally:
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        return
    init_ray(num_cpus=cores)
    try:
        if args.dedup_only:
            print_dedup_only(args.dedup_only, workdir)
            return
        if not args.skip_demo:
            run("demo", ["builtin:shakespeare"], workdir, cores)
        for size in args.sizes_mb:
            corpus = workdir / f"corpus-{size}mb"
            planted = generate_corpus(corpus, size)
            run(f"generated-{size}mb", [str(corpus)], workdir, cores, planted)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
