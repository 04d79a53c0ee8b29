"""How `llm-ray prepare` scales on corpora in the shapes real crawls have.

    python benchmarks/prepare_scale.py                                # the issue's sizes: ~25 min on 2 cores
    python benchmarks/prepare_scale.py --scale 0.01 --baseline-mb 3   # a check: ~1 min

Generates on this machine (benchmarks/_crawl_corpus.py) one stream of documents: ordinary web-like
text in five languages, 5% of it planted again as near-duplicates, 20,000 templated product pages
mixed in; written as one .jsonl.zst of 1 GB of text, the same over 100 files, a 100 MB prefix, and an
uncompressed prefix of --baseline-mb for the former pipeline. Runs, each with a fresh driver process
and a fresh local Ray of --cores CPUs:

  small     prepare on the 100 MB single file
  large     prepare on the 1 GB single file
  files     prepare on the 1 GB over 100 files
  baseline  the documents stage of the pipeline as it was (git commit --baseline-commit, checked out
            in a temporary worktree), on the uncompressed prefix: one task read the whole file
  plain     the documents stage of this code on the same uncompressed prefix

Prints per run and stage: seconds, MB of text per second per core, peak RSS of the driver and of
the largest Ray task (every process of the run sampled every 0.2 s, a worker's memory attributed to
the task its process title names; a task's figure is its private RSS, less the object-store pages
it maps, as the pipeline's own records count it, with its RSS beside it), dedup candidate and
confirmed edges, clusters found against clusters planted, near-dedup precision and recall on the
planted pairs; then the ratios between the 1 GB and the 100 MB single files, and the issue's targets
marked PASS or MISS (not asserted). At --scale below 1 the memory ratios compare shards smaller than
data.mb_per_task with full ones, and fixed start-up costs dominate the rates: only the full sizes
say something about the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _crawl_corpus import LANGUAGES, TEMPLATE, load_planted, write_corpus  # noqa: E402
from prepare_throughput import PeakMemory  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "18889e6"  # the last commit before streaming readers: one task read a whole file
STAGES = ("documents", "dedup", "tokenizer", "pack")
GB = 1e9

# Targets of the issue (printed as PASS/MISS beside the figures).
TASK_MEMORY_RATIO_MAX = 1.3  # largest task, 1 GB single file over 100 MB single file
TASK_MEMORY_MAX = 1.5 * GB
SPEEDUP_MIN = 1.7  # documents stage on one large file, this code over the former
TEMPLATED_DEDUP_SECONDS_MAX, TEMPLATED_DEDUP_MEMORY_MAX = 60.0, 1.0 * GB
MB_PER_S_PER_CORE_MIN = 2.0
PRECISION_MIN, RECALL_MIN = 0.99, 0.95

# The driver of one run, started as `python -c CHILD ARGS_JSON` with PYTHONPATH naming the code to
# measure: this repository or the baseline worktree. Only names both versions have.
CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import ray
import llm_ray
from llm_ray.config import load_config
from llm_ray.data.prepare import data_dir, prepare
from llm_ray.ray_utils import LOOPBACK, single_machine

# init_ray's own ray.init() would join a cluster another engineer started with `ray start` on this
# machine; a fresh local Ray of our own, loopback only, is what is measured.
single_machine()
ray.init(address="local", num_cpus=args["cores"], include_dashboard=False, _node_ip_address=LOOPBACK)
marks = {}

def log(line):
    if line.startswith("prepare:"):
        marks["documents_started"] = time.time()
    print("    " + line, flush=True)

cfg = load_config("debug", args["overrides"])
started = time.time()
if args["mode"] == "prepare":
    prepare(cfg, log=log)
    finished = time.time()
    timings = json.loads((data_dir(cfg).local() / "prepare_report.json").read_text())["timings_seconds"]
else:  # the documents stage alone
    from llm_ray.data import stages
    from llm_ray.data.documents import clean_documents, documents_key
    from llm_ray.data.sources import list_sources

    out = data_dir(cfg)
    out.mkdir()
    files = list_sources(cfg.data.sources, cfg.data)
    marks["documents_started"] = time.time()
    stages.run("documents", out / "documents", documents_key(cfg, files, []),
               lambda folder, key: clean_documents(cfg, files, [], folder, key, log), log)
    finished = time.time()
    timings = {"documents": finished - marks["documents_started"]}
worker_code = ray.get(ray.remote(lambda: __import__("llm_ray").__file__).remote())
print("BENCH " + json.dumps({"started": started, "finished": finished, "timings": timings,
                             "documents_started": marks.get("documents_started", started),
                             "driver_code": llm_ray.__file__, "worker_code": worker_code}), flush=True)
ray.shutdown()
"""


# ---------------------------------------------------------------- memory of a run's processes


def process_title(p: psutil.Process) -> str:
    """A Ray worker's title as it runs a task ('ray::clean_chunk_task', 'ray::IDLE'), else the program."""
    return " ".join(p.cmdline()[:1]).split("/")[-1][:80]


def is_task(title: str) -> bool:
    """A worker running one of the pipeline's tasks: not idle, not one of Ray's own agents or actors
    (ray::DashboardAgent, Ray Data's ray::_StatsActor...)."""
    return (title.startswith("ray::") and title not in ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
            and not title.endswith("Actor"))


def short_title(title: str) -> str:
    """'MapBatches(_load_kept)->MapBatches(assign_splits)->...' as its first operator."""
    title = title.removeprefix("ray::")
    return title.split("->")[0] + "->..." if "->" in title else title


def status_bytes(pid: int) -> tuple[int, int]:
    """(resident, resident shared memory) of a process, from /proc/<pid>/status. The shared part is
    mostly the pages of Ray's object store the process wrote or read: they stay mapped after the
    objects are gone and belong to the object store's budget, not to the task (llm_ray.memory)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssShmem:")):
                name, kib = line.split()[:2]
                fields[name] = int(kib) * 1024
    return fields.get("VmRSS:", 0), fields.get("RssShmem:", 0)


@dataclass
class Peaks:
    driver: int = 0  # RSS
    title: str = "-"  # the task with the largest private RSS
    task: int = 0  # its private RSS (RSS less shared memory)
    task_rss: int = 0  # its RSS at that moment


class RunMemory(PeakMemory):
    """PeakMemory's sampler over another process's tree (a run's driver, its Ray processes and
    workers), keeping every sample as (time, title, RSS, shared) so that the driver's peak and each
    task title's largest RSS can be read per stage afterwards."""

    def __init__(self, root_pid: int, interval_s: float = 0.2):
        super().__init__(interval_s)
        self.root = psutil.Process(root_pid)
        self.samples: list[tuple[float, str, int, int]] = []

    def _processes(self) -> list:
        return [self.root, *self.root.children(recursive=True)]

    def _measure(self, p) -> tuple[str, int]:
        rss, shared = status_bytes(p.pid)
        title = "driver" if p.pid == self.root.pid else process_title(p)
        self.samples.append((time.time(), title, rss, shared))
        return title, rss

    def peaks(self, start: float, end: float) -> Peaks:
        """The driver's peak and the largest task over [start, end]."""
        found = Peaks()
        for t, name, rss, shared in self.samples:
            if not start <= t <= end:
                continue
            if name == "driver":
                found.driver = max(found.driver, rss)
            elif is_task(name) and rss - shared > found.task:
                found.title, found.task, found.task_rss = name, rss - shared, rss
        return found


# ---------------------------------------------------------------- one run


@dataclass
class Run:
    label: str
    text_mb: float
    files: int
    mode: str  # "prepare" (every stage) or "documents" (the documents stage alone)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, and "total"
    memory: dict[str, Peaks] = field(default_factory=dict)  # per stage, and "total"
    recorded: dict[str, int] = field(default_factory=dict)  # peaks the tasks recorded themselves, per kind
    at_peak: str = ""
    dedup: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    languages: str = ""
    drops: dict = field(default_factory=dict)

    def rate(self, stage: str, cores: int) -> float:
        """MB of input text per second per core."""
        return self.text_mb / max(self.seconds.get(stage, 0), 1e-9) / cores


def run_driver(label: str, mode: str, sources: list[str], code: Path, workdir: Path, cores: int,
               extra: list[str]) -> tuple[dict, RunMemory, Path]:
    """Run CHILD as the driver of one run, sampling its process tree; (its BENCH record, the samples,
    its data folder)."""
    overrides = [f"output_dir={workdir / 'runs'}", f"name={label}", f"data.sources={json.dumps(sources)}",
                 "data.max_files=null", *extra]
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    scratch = workdir / "cwd" / label  # not the repository: python -c puts its working folder first on sys.path
    scratch.mkdir(parents=True, exist_ok=True)
    args = json.dumps({"mode": mode, "overrides": overrides, "cores": cores})
    child = subprocess.Popen([sys.executable, "-c", CHILD, args], cwd=scratch, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    record, tail = None, []
    with RunMemory(child.pid) as memory:
        for line in child.stdout:
            if line.startswith("BENCH "):
                record = json.loads(line[len("BENCH "):])
            else:
                tail = (tail + [line.rstrip()])[-40:]
                if line.startswith("    "):  # the pipeline's log; Ray's own chatter is left out
                    print(line.rstrip())
        child.wait()
    if child.returncode != 0 or record is None:
        raise RuntimeError(f"run {label} failed (exit {child.returncode}):\n" + "\n".join(tail))
    for where in ("driver_code", "worker_code"):
        if not Path(record[where]).is_relative_to(code):
            raise RuntimeError(f"run {label}: the {where.split('_')[0]} imported {record[where]}, not {code}")
    return record, memory, workdir / "runs" / label / "data"


def measure(label: str, mode: str, shape: dict, code: Path, workdir: Path, cores: int, extra: list[str],
            planted: dict | None) -> Run:
    paths = [f for f, _ in shape["files"]]
    sources = [str(Path(paths[0]).parent)] if len(paths) > 1 else paths
    print(f"\n== {label}: {shape['text_bytes'] / 1e6:,.1f} MB of text in {len(paths)} file(s), {mode}, {cores} cores")
    record, memory, data = run_driver(label, mode, sources, code, workdir, cores, extra)
    run = Run(label, shape["text_bytes"] / 1e6, len(paths), mode)
    start = record["documents_started"]
    for stage in STAGES:
        if stage in record["timings"]:
            run.seconds[stage] = record["timings"][stage]
            run.memory[stage] = memory.peaks(start, start + run.seconds[stage])
            start += run.seconds[stage]
    run.seconds["total"] = record["finished"] - record["started"]
    run.memory["total"] = memory.peaks(record["started"], record["finished"])
    run.at_peak = memory.breakdown(6)
    docs = json.loads((data / "documents" / "_stage.json").read_text())
    run.drops = dict(docs.get("drops", {}))
    for stage in STAGES:  # the pipeline's own figures, where its tasks record them (private RSS)
        path = data / stage / "_stage.json"
        if path.is_file():
            run.recorded.update(json.loads(path.read_text()).get("peak_rss_bytes", {}))
    if docs.get("languages"):
        first, count = shape["files"][0][1], shape["docs"]
        planted_languages = Counter(LANGUAGES[i] for i in planted["language"][first:first + count]) if planted else {}
        run.languages = (f"planted {dict(planted_languages.most_common())}; "
                         f"detected {dict(Counter(docs['languages']).most_common())}")
    if mode == "prepare":
        run.dedup = json.loads((data / "dedup" / "_stage.json").read_text())
        run.quality = dedup_quality(data, shape, planted)
    return run


# ---------------------------------------------------------------- near-dedup quality


def doc_ids(keys: list[str], first_id: dict[str, int]) -> np.ndarray:
    """Document ids of doc keys '<file uri>:<line number>' (a file holds consecutive ids, one a line)."""
    out = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        uri, line = key.rsplit(":", 1)
        out[i] = first_id[uri] + int(line) - 1
    return out


def dedup_quality(data: Path, shape: dict, planted: dict) -> dict:
    """Precision and recall of near-dedup on the planted clusters, from the documents that reached
    dedup (the documents shards) and those it kept (the keep lists).

    Recall: planted pairs (both members reached dedup) of which exactly one member was kept.
    Precision: documents dedup removed that belong to a planted cluster (a pair or a templated page).
    """
    import pyarrow.parquet as pq

    first_id = {uri: first for uri, first in shape["files"]}
    shards = json.loads((data / "documents" / "_stage.json").read_text())["shards"]
    n = len(planted["kind"])
    entered, kept = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for shard in shards:
        entered[doc_ids(pq.read_table(data / "documents" / shard, columns=["doc_key"]).column("doc_key").to_pylist(),
                        first_id)] = True
        kept[doc_ids(pq.read_table(data / "dedup" / shard, columns=["doc_key"]).column("doc_key").to_pylist(),
                     first_id)] = True
    pairs = planted["pairs"]
    pairs = pairs[entered[pairs[:, 0]] & entered[pairs[:, 1]]]
    found = kept[pairs[:, 0]] != kept[pairs[:, 1]]
    templated = (planted["kind"] == TEMPLATE) & entered
    member = templated.copy()
    member[pairs.ravel()] = True
    removed = entered & ~kept
    return {"pairs": len(pairs), "found": int(found.sum()), "recall": found.mean() if len(pairs) else float("nan"),
            "removed": int(removed.sum()),
            "precision": (removed & member).sum() / removed.sum() if removed.any() else float("nan"),
            "templated_in": int(templated.sum()), "templated_kept": int((templated & kept).sum()),
            "clusters_planted": len(pairs) + (templated.sum() > 1)}


# ---------------------------------------------------------------- printing


def gb(x: float) -> str:
    return f"{x / GB:.2f}"


def print_table(runs: list[Run], cores: int) -> None:
    print("\nlargest task: the most private RSS (RSS less Ray's shared object-store pages) of a worker running "
          "a pipeline task, its RSS beside it; sampled every 0.2 s")
    print(f"{'run':<10}{'MB':>8}{'files':>6}  {'stage':<10}{'s':>8}{'MB/s/core':>11}{'driver GB':>11}  "
          "largest task: private / RSS GB")
    for r in runs:
        for i, stage in enumerate([s for s in STAGES if s in r.seconds] + ["total"]):
            head = f"{r.label:<10}{r.text_mb:>8.1f}{r.files:>6}" if i == 0 else " " * 24
            m = r.memory[stage]
            print(f"{head}  {stage:<10}{r.seconds[stage]:>8.1f}{r.rate(stage, cores):>11.2f}{gb(m.driver):>11}  "
                  f"{short_title(m.title)} {gb(m.task)} / {gb(m.task_rss)}")
    print(f"\n{'run':<10}{'candidate':>11}{'confirmed':>11}{'clusters found/planted':>24}{'precision':>11}"
          f"{'recall':>8}  templated pages in -> kept")
    for r in runs:
        if not r.dedup:
            continue
        q = r.quality
        print(f"{r.label:<10}{r.dedup.get('candidate_edges', '-'):>11}{r.dedup['near_duplicate_pairs']:>11}"
              f"{str(r.dedup['clusters_with_copies']) + ' / ' + str(q['clusters_planted']):>24}"
              f"{q['precision']:>11.4f}{q['recall']:>8.4f}  {q['templated_in']} -> {q['templated_kept']}"
              f"   ({q['found']} of {q['pairs']} pairs, {q['removed']} removed)")
    for r in runs:
        print(f"{r.label}: all processes at the peak (GiB): {r.at_peak}")
        if r.recorded:
            print(f"{r.label}: peaks recorded by the tasks (GB): "
                  + ", ".join(f"{kind} {gb(peak)}" for kind, peak in r.recorded.items()))
        if r.languages:
            print(f"{r.label}: languages {r.languages}")
        if r.drops:
            print(f"{r.label}: dropped by cleaning {r.drops}")


def verdict(value: float, ok: bool) -> str:
    return "n/a" if value != value else "PASS" if ok else "MISS"  # NaN: nothing to measure at this scale


def print_targets(runs: dict[str, Run], cores: int) -> None:
    print("\nratios and targets (task memory: private RSS)")
    small, large = runs.get("small"), runs.get("large")
    if small and large:
        ratio = large.memory["total"].task / max(1, small.memory["total"].task)
        print(f"  1 GB / 100 MB single file: largest task {ratio:.2f}x ({gb(small.memory['total'].task)} -> "
              f"{gb(large.memory['total'].task)} GB)  [{verdict(ratio, ratio <= TASK_MEMORY_RATIO_MAX)}: at most "
              f"{TASK_MEMORY_RATIO_MAX}x]")
        per_stage = ", ".join(f"{stage} {large.memory[stage].task / max(1, small.memory[stage].task):.2f}x"
                              for stage in STAGES if stage in large.memory and stage in small.memory)
        print(f"  1 GB / 100 MB single file: largest task per stage {per_stage}; driver "
              f"{large.memory['total'].driver / max(1, small.memory['total'].driver):.2f}x; seconds "
              f"{large.seconds['total'] / small.seconds['total']:.2f}x for {large.text_mb / small.text_mb:.1f}x the "
              f"text; MB/s per core {large.rate('total', cores) / small.rate('total', cores):.2f}x")
    for r in runs.values():
        if r.mode != "prepare":
            continue
        task, rate, q = r.memory["total"].task, r.rate("total", cores), r.quality
        print(f"  {r.label}: largest task {gb(task)} GB [{verdict(task, task < TASK_MEMORY_MAX)}: under "
              f"{gb(TASK_MEMORY_MAX)}]; whole pipeline {rate:.2f} MB/s per core "
              f"[{verdict(rate, rate >= MB_PER_S_PER_CORE_MIN)}: at least {MB_PER_S_PER_CORE_MIN}]; "
              f"precision {q['precision']:.4f} [{verdict(q['precision'], q['precision'] >= PRECISION_MIN)}: at "
              f"least {PRECISION_MIN}], recall {q['recall']:.4f} [{verdict(q['recall'], q['recall'] >= RECALL_MIN)}: "
              f"at least {RECALL_MIN}]")
    if large:
        seconds, m, q = large.seconds["dedup"], large.memory["dedup"], large.quality
        ok = seconds < TEMPLATED_DEDUP_SECONDS_MAX and m.task < TEMPLATED_DEDUP_MEMORY_MAX and q["templated_kept"] == 1
        print(f"  large: dedup of {q['templated_in']:,} templated pages among {large.dedup['docs_in']:,} documents: "
              f"{seconds:.1f} s, largest task {gb(m.task)} GB ({short_title(m.title)}), {q['templated_kept']} "
              f"page(s) kept [{verdict(seconds, ok)}: under {TEMPLATED_DEDUP_SECONDS_MAX:.0f} s and "
              f"{gb(TEMPLATED_DEDUP_MEMORY_MAX)} GB, one page kept]")
    before, after = runs.get("baseline"), runs.get("plain")
    if before and after:
        speedup = after.rate("documents", cores) / before.rate("documents", cores)
        print(f"  one large uncompressed file ({after.text_mb:.0f} MB), documents stage: "
              f"{before.rate('documents', cores):.2f} -> {after.rate('documents', cores):.2f} MB/s per core, "
              f"{speedup:.2f}x [{verdict(speedup, speedup >= SPEEDUP_MIN)}: at least {SPEEDUP_MIN}x]; largest task "
              f"{gb(before.memory['documents'].task)} -> {gb(after.memory['documents'].task)} GB")


def baseline_worktree(workdir: Path, commit: str) -> Path:
    path = workdir / "baseline-code"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True,
                   capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="1.0: the issue's sizes (1 GB and 100 MB of text, 20,000 templated pages); 0.01 to check")
    parser.add_argument("--baseline-mb", type=float, default=300.0,
                        help="MB of text of the uncompressed file the former pipeline reads (it holds ~6x in memory)")
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT, help="the former pipeline's git commit")
    parser.add_argument("--only", nargs="+", choices=["small", "large", "files", "baseline", "plain"],
                        help="run only these (default: all)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPUs given to Ray")
    parser.add_argument("--out", type=Path, help="folder for the corpus and runs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and prepared data")
    args = parser.parse_args()
    only = set(args.only or ["small", "large", "files", "baseline", "plain"])
    if args.out and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty")
    workdir = (args.out or Path(tempfile.mkdtemp(prefix="llmray-scale-"))).resolve()
    worktree = None
    try:
        started = time.time()
        info = write_corpus(workdir / "corpus", 1000 * args.scale, 100 * args.scale, args.baseline_mb,
                            int(20_000 * args.scale))
        shapes, planted = info["shapes"], load_planted(info)
        print(f"corpus: {info['docs']:,} documents ({info['pairs']:,} planted pairs, {info['templated_pages']:,} "
              f"templated pages), {shapes['single']['text_bytes'] / 1e6:,.1f} MB of text, written in "
              f"{time.time() - started:.0f} s under {workdir}")
        for name, shape in shapes.items():
            stored = sum(Path(f).stat().st_size for f, _ in shape["files"]) / 1e6
            print(f"  {name:<7}{len(shape['files']):>4} file(s), {shape['docs']:>9,} documents, "
                  f"{shape['text_bytes'] / 1e6:>8,.1f} MB of text, {stored:>8,.1f} MB stored")
        languages = f"cleaning.languages={json.dumps(list(LANGUAGES))}"
        plan = [("small", "prepare", "prefix", REPO, [languages]),
                ("large", "prepare", "single", REPO, [languages]),
                ("files", "prepare", "files", REPO, [languages]),
                # The former pipeline knew no language filter: neither documents-stage run has one.
                ("baseline", "documents", "plain", None, []),
                ("plain", "documents", "plain", REPO, [])]
        runs = {}
        for label, mode, shape, code, extra in plan:
            if label not in only:
                continue
            if code is None:
                worktree = code = baseline_worktree(workdir, args.baseline_commit)
            try:
                runs[label] = measure(label, mode, shapes[shape], code, workdir, args.cores, extra, planted)
            except RuntimeError as e:  # the other runs still say something
                print(f"\n{e}")
            if not args.keep:
                shutil.rmtree(workdir / "runs" / label, ignore_errors=True)
        print_table(list(runs.values()), args.cores)
        print_targets(runs, args.cores)
        print(f"\nbenchmark: {time.time() - started:.0f} s")
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
