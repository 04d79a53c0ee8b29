"""Throughput, peak memory and near-dedup quality of `llm-ray prepare`.

    python benchmarks/prepare_throughput.py [--sizes-mb 50 200] [--skip-demo]

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

import psutil

from llm_ray.config import load_config
from llm_ray.data.corpus import shakespeare_dir
from llm_ray.data.prepare import data_dir, prepare
from llm_ray.ray_utils import init_ray


class PeakMemory:
    """Peak of the summed RSS of this process and all its descendants (Ray's processes included)."""

    def __init__(self, interval_s: float = 0.25):
        self.peak = 0
        self.parts: dict[str, tuple[int, int]] = {}  # process name -> (processes, summed RSS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s):
        me = psutil.Process()
        while not self._stop.is_set():
            total, parts = 0, {}
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                    name = " ".join(p.cmdline()[:1]).split("/")[-1][:40] if p != me else "driver"
                except psutil.Error:
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 200], help="generated corpus sizes")
    parser.add_argument("--skip-demo", action="store_true", help="skip the demo corpus")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed after)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llmray-bench-"))
    init_ray(num_cpus=cores)
    try:
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
