"""`llm-ray train`: launch Ray Train workers running DeepSpeed over the prepared shards."""

from __future__ import annotations

import hashlib
import io
import secrets
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import llm_ray
from llm_ray.checkpoint import MODEL_DIR, read_train_state
from llm_ray.checkpoint.location import checkpoint_location
from llm_ray.checkpoint.manifest import (ResumeError, ResumePoint, find_resume_point, read_checkpoint_files,
                                         read_manifests)
from llm_ray.config import Config, ConfigError
from llm_ray.data.pack import load_manifest
from llm_ray.data.prepare import PrepareError, cluster_paths, data_dir
from llm_ray.ray_utils import alive_nodes
from llm_ray.storage import (Location, StorageError, as_location, check_shared, check_writable, node_cache,
                             replace_folder)
from llm_ray.tracking import tracking_dir
from llm_ray.train.process_group import LoopbackTorchConfig
from llm_ray.train.resume import check_resumable
from llm_ray.train.stop import GracefulStop, TrainingStopped
from llm_ray.train.worker import train_loop_per_worker


@dataclass
class TrainResult:
    checkpoint: str  # a local folder with the latest checkpoint's inference files (model/ or above it;
    # for an output_dir on S3, a copy in this node's cache)
    step: int
    val_loss: float | None
    history: list[dict]


def checkpoint_storage(cfg: Config):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig, checked writable."""
    location, field = checkpoint_location(cfg)
    if not location.remote:
        return location.path, None
    try:
        check_writable(location, field)
    except StorageError as e:
        raise ConfigError(str(e)) from None
    return location.path, location.filesystem


def choose_checkpoint(cfg: Config, storage: str, filesystem, data_key: str | None, tokenizer_json: str,
                      log) -> ResumePoint:
    """The checkpoint a rerun of this run resumes from: the newest that verifies, checked against
    the config before any worker starts (see checkpoint.manifest and train.resume)."""
    from pyarrow import fs

    filesystem = filesystem or fs.LocalFileSystem()
    point = find_resume_point(filesystem, f"{storage}/{cfg.name}")
    for skipped, why in point.skipped:
        log(f"train: skipping the damaged checkpoint {skipped}: {why}")
    if point.path is not None:
        saved, saved_config, saved_tokenizer = read_checkpoint_files(filesystem, point.path)
        # (an elastic run is ZeRO 0-2, where any worker count resumes: the count checked is ZeRO-3's)
        check_resumable(saved, saved_config, cfg, data_key, cfg.train.max_workers, tokenizer_json, saved_tokenizer)
        log(f"train: resuming from step {saved.step} ({point.path})")
    return point


def train(cfg: Config, data_path: Path | None = None, log=print, test_hooks: dict | None = None,
          callbacks: tuple = ()) -> TrainResult:
    """Train on the prepared data at data_path (default: the run's own). callbacks are Ray Train
    callbacks (a sweep's trial passes one that reports to Ray Tune). test_hooks is a testing
    seam passed to the workers (see worker.nan_loss_hook); users never set it.
    A SIGTERM while it trains (main thread only) makes the workers checkpoint the step they are on and
    stop, then raises TrainingStopped (see train.stop)."""
    path = as_location(data_path, cfg.data.s3) if data_path else data_dir(cfg)
    check_cluster_storage(cfg, path)
    manifest = prepared_manifest(cfg, path)
    # Workers read blocks by index from memory-mapped shards (see train.data): one global order is
    # what makes resume exact, whatever the worker count. Shards in S3 are copied to each node once.
    shards = {split: [(path / s["file"]).uri for s in manifest["splits"][split]["shards"]]
              for split in ("train", "val")}
    t = cfg.train
    storage, filesystem = checkpoint_storage(cfg)
    tokenizer_json = (path / manifest["tokenizer"]).read_text()
    data_key = manifest.get("stage_keys", {}).get("pack")  # a resume must be on the same data
    point = choose_checkpoint(cfg, storage, filesystem, data_key, tokenizer_json, log)
    llm_ray.mark("trainer")
    with GracefulStop(t.preemption_grace_s, log) as stop:
        result = fit_restoring_sigint(make_trainer(cfg, payload={
            "tokenizer_json": tokenizer_json,
            # absolute: workers run in their own folders; None: the worker's own node cache (a run on S3)
            "tracking_dir": None if cfg.run_location.remote else str(tracking_dir(cfg)),
            "train_shards": shards["train"],
            "val_shards": shards["val"],
            "data_key": data_key,
            "data_path": path.uri,
            "resume_from": point.path,  # the newest complete checkpoint, if Ray's latest is damaged
            "damaged_checkpoints": [p for p, _ in point.skipped],
            "stop_flag": stop.name,
            "report_evaluations": bool(callbacks),  # a sweep's trial reads every evaluation
            **(test_hooks or {}),
        }, storage=storage, filesystem=filesystem, callbacks=callbacks, log=log))
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (see {checkpoint_location(cfg)[0]})")
    check_uploaded(result.checkpoint, filesystem)
    if stop.requested:
        from pyarrow import fs

        saved, _, _ = read_checkpoint_files(filesystem or fs.LocalFileSystem(), result.checkpoint.path)
        where = ("s3://" if filesystem is not None else "") + result.checkpoint.path
        raise TrainingStopped(saved.step, where, saved.step >= t.max_steps)
    return finished_run(cfg, result.checkpoint.path, filesystem is not None, log)


def check_uploaded(checkpoint, filesystem) -> None:
    """Raise ResumeError when the run's last checkpoint is not whole on the storage: its background upload
    failed (see train.upload; the workers said why). A rerun resumes from the newest complete one."""
    if filesystem is None:  # local storage: Ray copied it before the run went on
        return
    _, why = read_manifests(filesystem, checkpoint.path)
    if why:
        raise ResumeError(f"the run's last checkpoint s3://{checkpoint.path} did not reach the storage whole ({why}; "
                          "the workers' lines above say why): run the same command again to resume from the "
                          "newest complete checkpoint")


def make_trainer(cfg: Config, payload: dict, storage: str, filesystem, callbacks, log):
    """The TorchTrainer of this run: its workers get the config and payload (see worker.train_loop_per_worker)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "command_started": llm_ray.STARTED,  # for startup_seconds: the command's start to the first step
            "startup_marks": dict(llm_ray.MARKS),  # the driver's milestones (see TrainState.startup_phases)
            **payload,
        },
        torch_config=LoopbackTorchConfig(timeout_s=int(t.collective_timeout_s)),
        scaling_config=ScalingConfig(
            num_workers=tuple(t.num_workers) if t.elastic else t.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker}, placement_strategy=t.placement_strategy,
            elastic_resize_monitor_interval_s=t.elastic_resize_interval_s,
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=list(callbacks),
        ),
    )
    workers = (f"{t.min_workers} to {t.max_workers} workers (elastic; {cfg.accum_steps(t.min_workers)} to "
               f"{cfg.accum_steps(t.max_workers)} accumulation steps)" if t.elastic
               else f"{t.num_workers} workers, {cfg.grad_accum_steps} accumulation step(s)")
    log(f"train: {workers}, ZeRO-{t.zero_stage}, {t.precision}, {t.max_steps} steps")
    return trainer


def fit_restoring_sigint(trainer):
    """trainer.fit(), then the SIGINT handler that was there before: Ray Train installs its own (which
    holds the run's TrainController actor, keeping it alive) and never restores the previous one, so
    Ctrl-C after training (sampling, evaluation) was swallowed and the controller outlived the run."""
    main = threading.current_thread() is threading.main_thread()  # handlers are set there only
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def prepared_manifest(cfg: Config, path: Location) -> dict:
    """The manifest of the prepared data at path, checked against the config (block size, vocabulary)."""
    manifest = load_manifest(path)
    if manifest["block_size"] != cfg.data.block_size:
        raise PrepareError(f"data at {path} was packed with block_size {manifest['block_size']}, "
                           f"but data.block_size is {cfg.data.block_size}: run `llm-ray prepare` again")
    if manifest["vocab_size"] > cfg.vocab_size:
        raise PrepareError(f"the tokenizer at {path} has {manifest['vocab_size']} tokens, more than the "
                           f"model's vocabulary ({cfg.vocab_size})")
    return manifest


def finished_run(cfg: Config, checkpoint: str, remote: bool, log) -> TrainResult:
    """The run's result from its final checkpoint (a path on the checkpoint storage; remote: on S3):
    its inference files published to the run's model/, and its loss curve drawn."""
    published = publish_model(cfg, Location("s3://" + checkpoint, cfg.data.s3) if remote else Location(checkpoint), log)
    if remote:  # object storage: sampling and evaluation read the copy on this machine
        checkpoint = str(published)
    state = read_train_state(checkpoint)
    (cfg.run_location / "loss_curve.png").write_bytes(plot_losses(state["history"]))
    evals = [h for h in state["history"] if "val_loss" in h]
    return TrainResult(
        checkpoint=checkpoint,
        step=state["step"],
        val_loss=evals[-1]["val_loss"] if evals else None,
        history=state["history"],
    )


def publish_model(cfg: Config, checkpoint: Location, log) -> Path:
    """The final checkpoint's inference files in <output_dir>/<name>/model (a run folder on S3 gets them
    there too), and the local folder sampling and evaluation read: the run's own, or for a run on S3 a
    copy in this node's cache."""
    source = checkpoint / MODEL_DIR
    run = cfg.run_location
    if run.remote:
        local = node_cache("models", hashlib.sha256(source.uri.encode()).hexdigest()[:16], MODEL_DIR)
    else:
        local = run.local() / MODEL_DIR
    # Downloaded beside it under a name of its own (two publishers never share one), then swapped in
    # whole: a reader (a server on the run folder) always finds model/, old or new, never a mix, and no
    # file of an older checkpoint stays behind (see storage.replace_folder).
    local.parent.mkdir(parents=True, exist_ok=True)
    incoming = local.with_name(f".{MODEL_DIR}.{secrets.token_hex(8)}.tmp")
    incoming.mkdir()
    try:
        source.download(incoming)
        replace_folder(incoming, local)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    if run.remote:  # new files first, then the stale ones go: model/ is never empty meanwhile
        published = run / MODEL_DIR
        stale = set(published.files()) - {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
        published.upload(local)
        for rel in stale:
            published.filesystem.delete_file((published / rel).path)
        log(f"train: checkpoint {checkpoint}; inference files in {run / MODEL_DIR} (local copy {local})")
    else:
        log(f"train: checkpoint {checkpoint}; inference files copied to {local}")
    return local


def check_cluster_storage(cfg: Config, data: Location) -> None:
    """Refuse local paths on a multi-node Ray cluster unless data.shared_filesystem says they are shared."""
    nodes = alive_nodes()
    try:
        check_shared(cluster_paths(cfg, data=data), nodes, cfg.data.shared_filesystem)
    except StorageError as e:
        raise ConfigError(str(e)) from None


def plot_losses(history: list[dict]) -> bytes:
    """Training and validation loss against step, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="." if key == "val_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png")
    plt.close(fig)
    return buffer.getvalue()
