"""`llm-ray preflight`: what would stop a run, found before any worker or GPU is reserved.

Each check returns a row (name, "pass" / "warn" / "FAIL", what it found). The config itself is
validated when it loads (vocabulary and block size against the model included); the checks here
look at what the config meets: its data sources, its storage, the data it was prepared into, and
the cluster (or this machine) it will run on. Every job entrypoint (jobs/) runs them first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llm_ray.checkpoint import find_model_dir, read_config
from llm_ray.checkpoint.location import checkpoint_location
from llm_ray.config import Config, ConfigError
from llm_ray.data.corpus import CorpusError
from llm_ray.data.prepare import cluster_paths, data_dir
from llm_ray.data.sources import check_uri
from llm_ray.memory import gpu_total_bytes
from llm_ray.ray_utils import join
from llm_ray.storage import (StorageError, as_location, check_credentials, check_shared, check_writable, s3_error,
                             s3_filesystem)
from llm_ray.sweep.memory import cluster_memory, estimate_memory, worker_budget

GIB = 1024**3
PASS, WARN, FAIL = "pass", "warn", "FAIL"
# Ray Data's prepare stages stream blocks of up to this size per running task.
DATA_BLOCK_BYTES = 128 * 1024**2


@dataclass
class Check:
    name: str
    status: str
    detail: str


@dataclass
class Node:
    cpus: float
    gpus: float
    memory: int  # bytes Ray may give tasks and actors
    object_store: int


@dataclass
class Cluster:
    nodes: list[Node]
    where: str  # for the table: "the Ray cluster at ...", or this machine
    joined: bool  # a Ray cluster was joined (its GPUs can be asked for their memory; it may grow)


def this_machine() -> Cluster:
    """What a local Ray started by llm-ray would have: every CPU and GPU, and the machine's
    available memory split as Ray splits it (30% object store, the rest for tasks)."""
    import psutil

    available = psutil.virtual_memory().available
    object_store = int(0.3 * available)
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        pass
    node = Node(float(os.cpu_count() or 1), float(gpus), available - object_store, object_store)
    return Cluster([node], "this machine (a local Ray, estimated)", joined=False)


def join_cluster(address: str) -> Cluster:
    """The live nodes of the cluster at address (joined for the rest of this process: a job's command
    then runs on the same connection)."""
    import ray

    if not ray.is_initialized():
        join(address)
    nodes = [Node(float(r.get("CPU", 0)), float(r.get("GPU", 0)), int(r.get("memory", 0)),
                  int(r.get("object_store_memory", 0)))
             for r in (n["Resources"] for n in ray.nodes() if n.get("Alive"))]
    return Cluster(nodes, f"the Ray cluster at {address}", joined=True)


def cluster_row(address: str | None) -> tuple[Cluster | None, Check]:
    """(cluster, its row): $RAY_ADDRESS's or address's cluster joined, else this machine described."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        cluster = this_machine()
    else:
        try:
            cluster = join_cluster(address)
        except Exception as e:  # noqa: BLE001 - connection, token (ray.exceptions.AuthenticationError), address
            advice = (" (a cluster with token authentication: set RAY_AUTH_MODE=token and its token in "
                      "~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)" if "auth" in str(e).lower() else "")
            return None, Check("cluster", FAIL, f"cannot join the Ray cluster at {address}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{advice}")
    if not cluster.nodes:
        return None, Check("cluster", FAIL, f"{cluster.where} has no live node")
    cpus, gpus = sum(n.cpus for n in cluster.nodes), sum(n.gpus for n in cluster.nodes)
    detail = f"{cluster.where}: {len(cluster.nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs"
    return cluster, Check("cluster", PASS, detail)


# ------------------------------------------------------------------ checks


def check_sources(cfg: Config, cluster: Cluster | None = None) -> Check:
    """Every source's syntax; local sources exist (and are refused on a multi-node cluster unless the
    filesystem is shared, as prepare refuses them); S3 sources have credentials and exist."""
    found = []
    try:
        check_shared(cluster_paths(cfg, outputs=False, sources=True), len(cluster.nodes) if cluster else 1,
                     cfg.data.shared_filesystem)
        for source in cfg.data.sources:
            scheme = check_uri(source)
            if scheme == "builtin":
                found.append(f"{source} (fetched and cached by prepare)")
            elif scheme == "s3":
                check_credentials(source, cfg.data.s3, "data.sources")
                try:
                    info = s3_filesystem(cfg.data.s3).get_file_info(source.removeprefix("s3://").rstrip("/"))
                except OSError as e:
                    raise s3_error(source, e, "data.sources") from None
                if info.type.name == "NotFound":
                    raise CorpusError(f"data.sources: {source}: no such object or prefix")
                found.append(source)
            elif not Path(source).expanduser().exists():
                raise CorpusError(f"data.sources: {source}: no such file or folder on this machine")
            else:
                found.append(source)
    except (CorpusError, StorageError) as e:
        return Check("data sources", FAIL, str(e))
    return Check("data sources", PASS, ", ".join(found))


def check_storage(cfg: Config, cluster: Cluster) -> Check:
    """output_dir (and train.storage_path) writable; shared by every node of a multi-node cluster."""
    try:
        check_writable(cfg.run_location)
        if cfg.train.storage_path:
            check_writable(checkpoint_location(cfg)[0], "train.storage_path")
        check_shared(cluster_paths(cfg), len(cluster.nodes), cfg.data.shared_filesystem)
    except (StorageError, ConfigError) as e:
        return Check("storage", FAIL, str(e))
    return Check("storage", PASS, f"{cfg.run_location.uri} is writable")


def check_vocabulary(cfg: Config, data_path: str | None = None) -> Check:
    """The model's vocabulary holds the tokenizer's; blocks fit the context; prepared data (data_path,
    else the run's data folder, when there is some) was packed with this block size and a tokenizer
    the model can hold."""
    detail = (f"tokenizer {cfg.tokenizer.vocab_size} tokens, model vocabulary {cfg.vocab_size}; blocks of "
              f"{cfg.data.block_size} tokens in a context of {cfg.model.context_length}")
    try:
        manifest_file = (as_location(data_path, cfg.data.s3) if data_path else data_dir(cfg)) / "manifest.json"
        if not manifest_file.is_file():
            if data_path:
                return Check("vocabulary and blocks", FAIL, f"--data {data_path}: no prepared data (manifest.json)")
            return Check("vocabulary and blocks", PASS, detail + "; no prepared data yet")
        manifest = manifest_file.read_json()
        vocab, block = manifest["vocab_size"], manifest["block_size"]
    except (OSError, ValueError, KeyError, StorageError) as e:
        return Check("vocabulary and blocks", FAIL, f"{data_path or data_dir(cfg).uri}: cannot read its manifest: "
                     f"{type(e).__name__}: {e}")
    if vocab > cfg.vocab_size:
        return Check("vocabulary and blocks", FAIL, f"the prepared tokenizer ({manifest_file.parent.uri}) has "
                     f"{vocab} tokens, more than the model's vocabulary ({cfg.vocab_size})")
    if block != cfg.data.block_size:
        return Check("vocabulary and blocks", FAIL, f"data at {manifest_file.parent.uri} was packed with block_size "
                     f"{block}, the config says data.block_size {cfg.data.block_size}")
    return Check("vocabulary and blocks", PASS, detail + f"; prepared data agrees ({vocab} tokens)")


def check_workers(cfg: Config, cluster: Cluster) -> Check:
    """The training workers fit on the nodes (CPUs, and one GPU each, of one node per worker) under
    train.placement_strategy."""
    t = cfg.train
    unit = lambda x: round(x * 10_000)  # noqa: E731 - Ray counts resources in units of 1e-4
    per_node = [min(unit(n.cpus) // unit(t.cpus_per_worker), int(n.gpus) if t.use_gpu else t.max_workers)
                for n in cluster.nodes]
    if t.placement_strategy == "STRICT_PACK":  # all on one node
        fits = max(per_node, default=0)
    elif t.placement_strategy == "STRICT_SPREAD":  # one per node
        fits = sum(1 for k in per_node if k >= 1)
    else:
        fits = sum(per_node)
    cpus = sum(n.cpus for n in cluster.nodes)
    gpus = sum(n.gpus for n in cluster.nodes)
    have = f"{len(cluster.nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs"
    want = (f"train.num_workers {t.num_workers} x (train.cpus_per_worker {t.cpus_per_worker:g} CPUs"
            + (" + 1 GPU" if t.use_gpu else "") + ")")
    if fits < t.min_workers:  # an elastic run starts with as many as fit, from min
        detail = (f"{want} do not fit: {have} hold {fits} such worker(s) "
                  f"(train.placement_strategy {t.placement_strategy})")
        if cluster.joined:  # Ray Train waits for the resources: an autoscaler may add nodes (never, without one)
            return Check("workers", WARN, detail + " alive now; Ray Train waits until an autoscaler adds nodes")
        return Check("workers", FAIL, detail)
    if not t.use_gpu and gpus:
        return Check("workers", WARN, f"{want} fit ({have}); train.use_gpu is false, the GPUs stay idle")
    return Check("workers", PASS, f"{want} fit ({have})")


def check_memory(cfg: Config, cluster: Cluster) -> Check:
    """The estimated memory of one worker (sweep.memory, shared with Tune's pre-flight) against
    what a worker gets: a GPU's memory, or its share of the largest node's."""
    estimate = estimate_memory(cfg)
    where = "per GPU" if cfg.train.use_gpu else "per worker"
    if cluster.joined:
        memory = cluster_memory(cfg.train.use_gpu, gpu_timeout_s=30)
    else:
        largest = max(cluster.nodes, key=lambda n: n.memory)
        memory = {"node": largest.memory, "node_cpus": largest.cpus}
        if cfg.train.use_gpu:
            memory["gpu"] = gpu_total_bytes()
    budget = worker_budget(memory, cfg)
    stage = f"ZeRO-{cfg.train.zero_stage}" + (" with offload" if cfg.train.offload_optimizer else "")
    if budget is None:
        return Check("memory", WARN, f"{stage}: needs about {estimate.describe()}; the memory {where} is unknown")
    detail = f"{stage}: needs about {estimate.describe()}; {budget / GIB:.2f} GiB {where}"
    return Check("memory", PASS if estimate.total <= budget else FAIL, detail)


def check_object_store(cfg: Config, cluster: Cluster) -> Check:
    """Ray Data's prepare keeps a few blocks per running task in the object store; less than two
    per CPU of a node means spilling to disk (slower, not wrong): a warning."""
    smallest = min(cluster.nodes, key=lambda n: n.object_store / max(n.cpus, 1))
    wanted = int(2 * DATA_BLOCK_BYTES * max(smallest.cpus, 1))
    detail = (f"{smallest.object_store / GIB:.2f} GiB on the node with the least per CPU ({smallest.cpus:g} CPUs); "
              f"prepare streams 128 MiB blocks: {wanted / GIB:.2f} GiB holds two per CPU")
    return Check("object store", PASS if smallest.object_store >= wanted else WARN,
                 detail + ("" if smallest.object_store >= wanted else "; Ray will spill blocks to disk"))


# ------------------------------------------------------------------ runs


def preflight(cfg: Config, address: str | None = None, data_path: str | None = None) -> list[Check]:
    """Every check of a training config against the cluster at address ($RAY_ADDRESS when None;
    this machine when neither is set); data_path: the prepared data a `train --data` reads."""
    rows = [Check("config", PASS, f"{cfg.name}: valid")]
    cluster, row = cluster_row(address)
    rows.append(row)
    if cluster is None:
        return rows
    rows += [check_sources(cfg, cluster), check_storage(cfg, cluster), check_vocabulary(cfg, data_path),
             check_workers(cfg, cluster),
             check_memory(cfg, cluster), check_object_store(cfg, cluster)]
    return rows


def preflight_checkpoint(checkpoint: str | Path, address: str | None = None) -> list[Check]:
    """The checks of an eval or serve job: the checkpoint's files and config, and the cluster."""
    from tokenizers import Tokenizer

    try:
        model_dir = find_model_dir(checkpoint)
        cfg = read_config(model_dir)
        vocab = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size()
    except Exception as e:  # noqa: BLE001 - yaml, pydantic and tokenizers errors alike: one row naming the file
        return [Check("checkpoint", FAIL, f"{checkpoint}: {type(e).__name__}: {e}")]
    status = PASS if vocab <= cfg.vocab_size else FAIL
    rows = [Check("checkpoint", status, f"{model_dir}: tokenizer {vocab} tokens, model vocabulary {cfg.vocab_size}")]
    _, row = cluster_row(address)
    return [*rows, row]


def failed(rows: list[Check]) -> bool:
    return any(r.status == FAIL for r in rows)


def table(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':<{width}}  result  detail"]
    lines += [f"{r.name:<{width}}  {r.status:<6}  {r.detail}" for r in rows]
    verdict = "preflight: FAILED" if failed(rows) else "preflight: all checks passed"
    return "\n".join([*lines, verdict])
