"""`llm-ray train`: launch Ray Train workers running DeepSpeed over the prepared shards."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from llm_ray.checkpoint import MODEL_DIR, read_train_state
from llm_ray.config import Config, ConfigError
from llm_ray.data.corpus import CorpusError
from llm_ray.data.sources import check_credentials, check_uri, s3_error, s3_filesystem
from llm_ray.data.prepare import PrepareError, data_dir, load_manifest
from llm_ray.train.resume import ResumePoint, check_resumable, find_resume_point, read_checkpoint_files


@dataclass
class TrainResult:
    checkpoint: str  # a local folder with the latest checkpoint's inference files (model/ or above it)
    step: int
    val_loss: float | None
    history: list[dict]


def checkpoint_storage(cfg: Config):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig, from train.storage_path."""
    uri = cfg.train.storage_path
    if uri is None:
        return str(cfg.run_dir / "checkpoints"), None
    field = "train.storage_path"
    try:
        scheme = check_uri(uri, field)  # rejects other schemes, '..' segments, credentials in the URI
        if scheme == "":
            return str(Path(uri).expanduser().resolve()), None
        if scheme != "s3":
            raise CorpusError(f"{field}: {uri!r} is not a folder or an s3://bucket/prefix URI")
        if cfg.data.s3.anonymous:
            raise CorpusError(f"{field}: {uri}: checkpoints cannot be written anonymously; set "
                              "data.s3.anonymous: false and provide credentials")
        check_credentials(uri, cfg.data.s3, field)
        filesystem = s3_filesystem(cfg.data.s3)
        bucket = uri[len("s3://"):].split("/")[0]
        try:
            missing = filesystem.get_file_info(bucket).type.name == "NotFound"
        except OSError as e:
            raise s3_error(uri, e, field) from None
        if missing:
            raise CorpusError(f"{field}: {uri}: the bucket does not exist")
    except CorpusError as e:  # a config value, so the config error's exit code
        raise ConfigError(str(e)) from None
    return uri[len("s3://"):].rstrip("/"), filesystem


def choose_checkpoint(cfg: Config, storage: str, filesystem, data_key: str | None, tokenizer_json: str,
                      log) -> ResumePoint:
    """The checkpoint a rerun of this run resumes from: the newest that verifies, checked against
    the config before any worker starts (see train.resume)."""
    from pyarrow import fs

    filesystem = filesystem or fs.LocalFileSystem()
    point = find_resume_point(filesystem, f"{storage}/{cfg.name}")
    for skipped, why in point.skipped:
        log(f"train: skipping the damaged checkpoint {skipped}: {why}")
    if point.path is not None:
        saved, saved_config, saved_tokenizer = read_checkpoint_files(filesystem, point.path)
        check_resumable(saved, saved_config, cfg, data_key, cfg.train.num_workers, tokenizer_json, saved_tokenizer)
        log(f"train: resuming from step {saved.step} ({point.path})")
    return point


def train(cfg: Config, data_path: Path | None = None, log=print, test_hooks: dict | None = None,
          callbacks: tuple = ()) -> TrainResult:
    """Train on the prepared data at data_path (default: the run's own). callbacks are Ray Train
    callbacks (a sweep's trial passes one that reports to Ray Tune). test_hooks is a testing
    seam passed to the workers (see worker.nan_loss_hook); users never set it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from llm_ray.train.worker import train_loop_per_worker

    path = Path(data_path) if data_path else data_dir(cfg)
    manifest = load_manifest(path)
    if manifest["block_size"] != cfg.data.block_size:
        raise PrepareError(f"data at {path} was packed with block_size {manifest['block_size']}, "
                           f"but data.block_size is {cfg.data.block_size}: run `llm-ray prepare` again")
    if manifest["vocab_size"] > cfg.vocab_size:
        raise PrepareError(f"the tokenizer at {path} has {manifest['vocab_size']} tokens, more than the "
                           f"model's vocabulary ({cfg.vocab_size})")
    # Workers read blocks by index from memory-mapped shards (see train.data): one global order is
    # what makes resume exact, whatever the worker count. The folder must be reachable from every
    # worker (on a multi-node cluster: shared storage).
    shards = {split: [str((path / s["file"]).resolve()) for s in manifest["splits"][split]["shards"]]
              for split in ("train", "val")}
    t = cfg.train
    storage, filesystem = checkpoint_storage(cfg)
    tokenizer_json = (path / manifest["tokenizer"]).read_text(encoding="utf-8")
    data_key = manifest.get("stage_keys", {}).get("pack")  # a resume must be on the same data
    point = choose_checkpoint(cfg, storage, filesystem, data_key, tokenizer_json, log)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "tokenizer_json": tokenizer_json,
            "run_dir": str(cfg.run_dir),  # absolute: workers run in their own folders
            "train_shards": shards["train"],
            "val_shards": shards["val"],
            "data_key": data_key,
            "data_path": str(path.resolve()),
            "resume_from": point.path,  # the newest complete checkpoint, if Ray's latest is damaged
            "damaged_checkpoints": [p for p, _ in point.skipped],
            **(test_hooks or {}),
        },
        torch_config=TorchConfig(timeout_s=int(t.collective_timeout_s)),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
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
    log(f"train: {t.num_workers} workers, ZeRO-{t.zero_stage}, {t.precision}, "
        f"{cfg.grad_accum_steps} accumulation step(s), {t.max_steps} steps")
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (see {t.storage_path or cfg.run_dir})")
    checkpoint = result.checkpoint.path
    if filesystem is not None:  # object storage: the inference files come down to the run folder
        from pyarrow import fs

        local = cfg.run_dir / MODEL_DIR
        incoming = cfg.run_dir / f".{MODEL_DIR}.tmp"
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir(parents=True)
        fs.copy_files(f"{checkpoint}/{MODEL_DIR}", str(incoming), source_filesystem=filesystem,
                      destination_filesystem=fs.LocalFileSystem())
        shutil.rmtree(local, ignore_errors=True)  # no file of an older checkpoint stays behind
        incoming.rename(local)
        log(f"train: checkpoint s3://{checkpoint}; inference files copied to {local}")
        checkpoint = str(local)
    state = read_train_state(checkpoint)
    plot_losses(state["history"], cfg.run_dir / "loss_curve.png")
    evals = [h for h in state["history"] if "val_loss" in h]
    return TrainResult(
        checkpoint=checkpoint,
        step=state["step"],
        val_loss=evals[-1]["val_loss"] if evals else None,
        history=state["history"],
    )


def plot_losses(history: list[dict], path: Path) -> None:
    """Training and validation loss against step, as a PNG next to the run's outputs."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
