"""The Ray Train boundary: each worker validates its config, builds the DeepSpeed engine, picks
up a checkpoint, opens the packed shards at the saved data position (see ``train.data``) and
calls ``run_training``, which knows nothing about Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from llm_ray.checkpoint import (HISTORY_DIR, MODEL_DIR, WEIGHTS, TrainState, discard_history_after,
                                read_train_state, save_inference, tied_names, write_history, write_safetensors)
from llm_ray.checkpoint.location import checkpoint_location
from llm_ray.checkpoint.manifest import (find_resume_point, newest_complete, read_manifests, read_saved_config,
                                         write_manifest)
from llm_ray.config import Config, S3Config, model_spec
from llm_ray.model import GPT
from llm_ray.storage import Location, local_copy, node_cache
from llm_ray.tracking import make_tracker, tracking_dir
from llm_ray.train.data import BlockOrder, MicroBatches, PackedBlocks, validation_batches
from llm_ray.train.engine import UNIVERSAL_INFO, build_engine, build_model, parameter_share, to_universal
from llm_ray.train.loop import run_training
from llm_ray.train.resume import check_resumable, regroups
from llm_ray.train.stop import StopWatch
from llm_ray.train.upload import remote_uploads, report_uploaded

DS_DIR = "deepspeed"
DS_TAG = "state"


def consolidated_state_dict(engine, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """Full model weights on rank 0 (None elsewhere). Under ZeRO-3 every rank must call this."""
    module = engine.module
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with gather:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None


def write_zero3_weights(engine, path: str | None) -> None:
    """ZeRO-3's model.safetensors: every worker takes part in gathering one parameter at a time, and
    rank 0 (path given) appends it to the file, so no worker holds more than one whole parameter
    beyond its partition. Every rank must call this."""
    import deepspeed

    tied = tied_names(engine.module.spec)
    params = [(n, p) for n, p in engine.module.named_parameters() if n not in tied]

    def gathered():
        for _, p in params:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield p.data

    write_safetensors(path, [(n, p.dtype, tuple(p.ds_shape)) for n, p in params], gathered())


def worker_log(line: str) -> None:
    """One progress line on the worker's stdout, which Ray forwards to the driver.

    Not print(): Ray Train redirects print to its logger, which shows each line twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def node_leaders(value, node_rank: int, leader: bool) -> dict:
    """{node rank: value} of each node's local rank 0 (leader), on every worker: one all_gather over the
    whole group, so a node's workers need no process group of their own (Ray Train numbers the nodes)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (node_rank, value) if leader else None)
    return dict(g for g in gathered if g is not None)


@contextlib.contextmanager
def universal_checkpoint(ds_dir: str, ctx):
    """DeepSpeed's universal form of the checkpoint, converted once per node by its local rank 0 into a
    folder of its own (mkdtemp: two runs on one machine never share one, whatever their names), whose
    path that worker passes to the node's others; removed after every worker loaded it. Every worker
    must enter it. A failed conversion on any node raises on every worker instead of leaving them waiting."""
    import shutil

    leader = ctx.get_local_rank() == 0
    node_dir = error = None
    if leader:
        node_dir = tempfile.mkdtemp(prefix="llm-ray-universal-")
        try:
            to_universal(ds_dir, DS_TAG, node_dir)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
    try:
        folders = node_leaders((node_dir, error), ctx.get_node_rank(), leader)
        failed = [f"node {n}: {why}" for n, (_, why) in sorted(folders.items()) if why]
        if failed:
            raise RuntimeError(f"converting {ds_dir} to DeepSpeed's universal checkpoint failed: {'; '.join(failed)}")
        yield folders[ctx.get_node_rank()][0]
    finally:
        try:
            dist.barrier()  # every worker has loaded it (or failed alike)
        finally:
            if leader:
                shutil.rmtree(node_dir, ignore_errors=True)


def nan_loss_hook(spec: dict | None, rank: int):
    """Testing seam: {"rank": r, "micro_batches": [i, ...]} makes worker r's loss NaN at those
    micro-batches (counted from 0 over the whole run), as a bad batch or an overflow would."""
    if not spec or spec["rank"] != rank:
        return None
    seen = {"count": 0}

    def hook(state, loss):
        index = seen["count"]
        seen["count"] += 1
        return loss * float("nan") if index in spec["micro_batches"] else loss

    return hook


def apply_torch_threads(threads: int | None) -> None:
    """train.torch_threads: torch's intra-op threads in this worker (None keeps Ray's setting)."""
    if threads:
        torch.set_num_threads(threads)


def return_freed_memory(threshold_bytes: int = 4 << 20) -> None:
    """Make freed tensors of 4 MiB or more go back to the operating system (glibc only).

    glibc raises its mmap threshold each time a large block is freed, so later tensors come from the
    heap, which rarely shrinks: a ZeRO-3 worker's resident memory would stay at the high-water mark
    of every parameter it ever gathered. A fixed threshold (mallopt M_MMAP_THRESHOLD) gives each
    such tensor its own mapping, unmapped when freed. The price is a page fault per fresh mapping:
    measured on a 60M model, 2 workers, CPU: peak 1.34 GB instead of 1.89 GB per worker, steps
    about 1.3x longer (1 MiB: 1.24 GB, 1.5x; 8 MiB: 1.58 GB, 1.1x). ZeRO-3 is chosen for memory.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold_bytes)  # M_MMAP_THRESHOLD = -3 in glibc's malloc.h
    except (OSError, AttributeError):
        pass  # not glibc: nothing to set


def quiet_deprecated_collectives() -> None:
    """DeepSpeed 0.19 calls torch collectives that torch 2.13 deprecated, at every step (ZeRO-3:
    reduce_scatter_tensor too): without this, a warning line per step."""
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=f".*{name}.* is deprecated", category=FutureWarning)


def checkpoint_to_resume(payload: dict, cfg: Config):
    """The checkpoint to resume from: Ray's latest of the run, or the newest complete one the driver found
    (see checkpoint.manifest) when that is newer or Ray's is damaged. A driver killed mid-training leaves
    Ray's record at the last checkpoint it registered, while its workers may finish one more; a restart
    within this run (train.max_failures, an elastic resize) makes Ray's the newer, unless the workers wrote
    complete ones Ray had not registered yet when they failed, or its upload failed (see train.upload).
    Checkpoint folder names sort by time."""
    import posixpath

    import ray.train
    from pyarrow import fs

    checkpoint = ray.train.get_checkpoint()
    location = checkpoint_location(cfg)[0]  # train.storage_path, else under output_dir (S3 too)
    filesystem = location.filesystem if location.remote else None
    damaged = {p.rstrip("/") for p in payload.get("damaged_checkpoints", [])}
    if checkpoint is not None and checkpoint.path.rstrip("/") in damaged:
        checkpoint = None
    newest = payload.get("resume_from")
    if checkpoint is not None:  # a restart within the run (train.max_failures, an elastic resize)
        # the run's folder on the storage, as Ray names it (a relative output_dir means another folder here)
        run_path, listing = posixpath.dirname(checkpoint.path.rstrip("/")), filesystem or fs.LocalFileSystem()
        if filesystem is not None and read_manifests(filesystem, checkpoint.path)[1]:
            # its background upload failed (see train.upload): the newest whole one
            newest = find_resume_point(filesystem, run_path).path
            checkpoint = None
        else:  # complete ones the workers wrote after Ray's latest, before they failed
            newest = newest_complete(listing, run_path, Path(checkpoint.path.rstrip("/")).name,
                                     checksums=filesystem is None) or newest
    if newest and (checkpoint is None or Path(newest.rstrip("/")).name > Path(checkpoint.path.rstrip("/")).name):
        checkpoint = ray.train.Checkpoint(newest, filesystem=filesystem)
    return checkpoint


def restore(cfg: Config, model, payload: dict, ctx):
    """(engine, state) restored from the checkpoint to resume, or (None, None) for a fresh start."""
    checkpoint = checkpoint_to_resume(payload, cfg)
    if checkpoint is None:
        return None, None
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(checkpoint.as_directory())
        ds_dir = os.path.join(d, DS_DIR)
        saved = TrainState(**read_train_state(d, history=False))
        # Checked by the driver already (train.trainer); again here for restarts within a run.
        check_resumable(saved, read_saved_config(d), cfg, payload["data_key"], world)
        # The optimizer state is sharded over the workers: under another worker count it is
        # re-partitioned through DeepSpeed's universal checkpoint format.
        regroup = regroups(os.path.join(ds_dir, DS_TAG), saved.world_size, world)
        if regroup:
            ds_dir = stack.enter_context(universal_checkpoint(ds_dir, ctx))
            if rank == 0:
                worker_log(f"re-partitioned the optimizer state of {saved.world_size} workers for {world}")
        engine = build_engine(model, cfg, load_universal=regroup)
        _, client_state = engine.load_checkpoint(ds_dir, tag=DS_TAG)
    state = resumed_state(client_state["train_state"], cfg, world, payload["data_key"], payload.get("data_path"))
    if rank == 0:
        worker_log(f"resumed from step {state.step}, block {state.samples} of the data stream ({checkpoint.path})")
    return engine, state


def resumed_state(saved: dict, cfg: Config, world: int, data_key: str | None, data_path: str | None) -> TrainState:
    """The training state a checkpoint saved, continued by this run: its workers, data and restart."""
    state = TrainState(**saved)
    state.resumed_from.append(state.step)
    state.world_size, state.data_key, state.data_path = world, data_key, data_path
    if state.step and not state.samples:  # written before the data position was recorded
        state.samples = state.step * cfg.train.total_batch_tokens // cfg.data.block_size
    return state


def open_history(state: TrainState, cfg: Config, rank: int) -> None:
    """Point the state at the run's history folder (kept from the checkpoint: the history goes on where
    it is) and, on rank 0, delete what an earlier run wrote there past the step this one starts from:
    a crashed run's files beyond its last complete checkpoint, or a whole history whose checkpoints
    are gone. Without that, a file of the crashed run and one of this run could cover the same steps."""
    if state.history_dir is None:  # a fresh run
        state.history_dir = (cfg.run_location / HISTORY_DIR).uri
    if rank == 0:
        stale = discard_history_after(Location.parse(state.history_dir, cfg.data.s3), state.history_through)
        if stale:
            worker_log(f"discarded {len(stale)} history file(s) written after step {state.history_through} by an "
                       f"earlier run: {', '.join(stale)}")


def flush_history(state: TrainState, rank: int, s3: S3Config) -> None:
    """Move the entries logged since the last checkpoint to the run's history folder (rank 0 writes them;
    every worker drops them): a checkpoint then records only the step up to which the folder holds the
    history. Written before the checkpoint, so a complete checkpoint always has its history."""
    if rank == 0:
        write_history(Location.parse(state.history_dir, s3), state.history_through, state.step, state.history)
    state.history = []
    state.history_through = state.step


def save_checkpoint(directory: str, engine, cfg: Config, state: TrainState, tokenizer_json: str, rank: int,
                    world: int) -> None:
    """This worker's part of a checkpoint in directory: DeepSpeed's resume files, the inference files
    (rank 0) and, last, its manifest. The history since the last checkpoint goes to the run's history
    folder first (see flush_history). Every worker calls it (ZeRO-3 gathers the weights together)."""
    flush_history(state, rank, cfg.data.s3)
    engine.save_checkpoint(os.path.join(directory, DS_DIR), tag=DS_TAG,
                           client_state={"train_state": asdict(state), **UNIVERSAL_INFO})
    weights = None
    if cfg.train.zero_stage == 3:  # streamed one parameter at a time
        target = os.path.join(directory, MODEL_DIR, WEIGHTS) if rank == 0 else None
        if target:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        write_zero3_weights(engine, target)
    else:
        weights = consolidated_state_dict(engine, cfg.train.zero_stage, rank)
    if rank == 0:
        save_inference(directory, weights, cfg, tokenizer_json, asdict(state))
    write_manifest(directory, rank, world)  # last: its presence means this worker's part is complete


def record_world_size(state: TrainState, world: int, rank: int) -> None:
    """Note the worker count in state.world_sizes when it starts or changes (an elastic run's restarts)."""
    if not state.world_sizes or state.world_sizes[-1][1] != world:
        state.world_sizes.append([state.step, world])
        if rank == 0 and len(state.world_sizes) > 1:
            worker_log(f"training goes on with {world} workers from step {state.step} (was {state.world_sizes[-2][1]})")


def checkpointing(cfg: Config, engine, tokenizer_json: str, rank: int, world: int, payload: dict):
    """(save, report) for run_training: save(state, metrics) writes a checkpoint and reports it to Ray Train
    (uploaded by train.upload for remote storage); report(metrics) reports an evaluation alone."""
    import ray.train

    uploads = remote_uploads(cfg, rank, worker_log)

    def save(state: TrainState, metrics: dict) -> None:
        if uploads is None:  # local storage: Ray copies it there before training goes on
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, engine, cfg, state, tokenizer_json, rank, world)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            return
        report_uploaded(uploads, metrics, lambda tmp: save_checkpoint(tmp, engine, cfg, state, tokenizer_json, rank,
                                                                      world))

    def report(metrics: dict) -> None:
        # Ray Train hands reports on in order: a metrics-only report waits for the upload before it. Only a
        # sweep's trial needs them (its searcher and scheduler read each evaluation); every worker decides alike.
        if uploads is None or not uploads.background or payload.get("report_evaluations"):
            ray.train.report(metrics)

    return save, report


def local_shards(uris: list[str], cfg: Config, data_key: str | None) -> list[Path]:
    """Local paths of the packed shards: the files themselves, or for prepared data on S3 copies in this
    node's cache (made once per node, keyed by the pack stage's key: same files, same order, same blocks)."""
    paths = []
    for uri in uris:
        location = Location.parse(uri, cfg.data.s3, "--data")
        split = location.parent.name  # pack/<split>/<shard>.npy: stems repeat across splits
        key = data_key or hashlib.sha256(location.parent.parent.uri.encode()).hexdigest()[:16]
        paths.append(local_copy(location, node_cache("data", key, split)))
    return paths


def train_loop_per_worker(payload: dict) -> None:
    """Entry point of each Ray Train worker."""
    import ray.train
    import ray.train.torch

    marks = {**payload.get("startup_marks", {}), "worker": time.time()}
    quiet_deprecated_collectives()
    cfg = Config.model_validate(payload["config"])
    tokenizer_json: str = payload["tokenizer_json"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()

    apply_torch_threads(cfg.train.torch_threads)

    if cfg.train.zero_stage == 3:
        return_freed_memory()
    with torch.device("meta"):  # sizes only: FLOPs from the architecture, no memory
        model_flops = GPT(model_spec(cfg)).flops_per_token(cfg.data.block_size)
    model = build_model(cfg)  # identical initial weights on every worker; under ZeRO-3, partitioned
    model.activation_checkpointing = cfg.train.activation_checkpointing
    shares = [None] * ctx.get_world_size()
    dist.all_gather_object(shares, parameter_share(model))

    world = ctx.get_world_size()
    engine, state = restore(cfg, model, payload, ctx)
    if engine is None:
        engine = build_engine(model, cfg)
        state = TrainState(world_size=world, data_key=payload["data_key"], data_path=payload.get("data_path"))
    open_history(state, cfg, rank)
    record_world_size(state, world, rank)
    state.parameters_held = [held for held, _ in shares]
    state.parameters = shares[0][1]
    state.worker_nodes = [None] * world
    dist.all_gather_object(state.worker_nodes, ray.get_runtime_context().get_node_id())
    if rank == 0 and cfg.train.zero_stage == 3:
        worker_log(f"ZeRO-3: each worker holds {min(state.parameters_held):,} to {max(state.parameters_held):,} of "
                   f"the model's {state.parameters:,} parameters")
    if cfg.train.compile:
        engine.compile()  # compiles the module in place: parameter names and checkpoints are unchanged
    marks["engine"] = time.time()

    micro = cfg.train.micro_batch_size
    val_batches = [(torch.from_numpy(b), w) for b, w in validation_batches(
        PackedBlocks(local_shards(payload["val_shards"], cfg, payload["data_key"])), cfg.train.eval_batches * micro,
        cfg.seed, rank, world, micro)]
    blocks = PackedBlocks(local_shards(payload["train_shards"], cfg, payload["data_key"]))
    pinned = device.type == "cuda"  # a host-to-device copy from pinned memory overlaps the compute
    train_batches = MicroBatches(blocks, BlockOrder(len(blocks), cfg.seed, cfg.train.shuffle), state.samples, rank,
                                 world, cfg.train.micro_batch_size, prefetch=cfg.train.prefetch_batches,
                                 prepare=lambda b: torch.from_numpy(b).pin_memory() if pinned else torch.from_numpy(b))

    marks["data"] = time.time()

    save, report = checkpointing(cfg, engine, tokenizer_json, rank, world, payload)

    folder = Path(payload["tracking_dir"]) if payload.get("tracking_dir") else tracking_dir(cfg)
    tracker = make_tracker(cfg, rank, folder, state.tracker_run_id)
    state.tracker_run_id = tracker.run_id
    stop = StopWatch(payload.get("stop_flag"), rank)  # the driver's SIGTERM (see train.stop)
    try:
        run_training(cfg, engine, train_batches, val_batches, state, save, report, rank, device,
                     worker_log, tracker, model_flops, loss_hook=nan_loss_hook(payload.get("test_nan_loss"), rank),
                     started=payload.get("command_started"), startup_marks=marks, stop_requested=stop.requested)
    finally:
        stop.close()
        train_batches.close()
        tracker.finish()
