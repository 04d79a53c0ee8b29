"""Metrics trackers behind one small interface: no-op and Weights & Biases.

Only rank 0 tracks. W&B runs offline unless WANDB_API_KEY is set (or the config asks);
its run id travels in the checkpoint so that a resumed run continues the same W&B run.
Nothing but the metrics and the resolved config (which holds no credentials) is sent.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Protocol

from llm_ray.config import Config
from llm_ray.storage import node_cache


class Tracker(Protocol):
    run_id: str | None

    def log(self, metrics: dict, step: int) -> None: ...

    def finish(self) -> None: ...


class NoOpTracker:
    run_id = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def wandb_mode(setting: str) -> str:
    """tracking.wandb_mode resolved: auto is online when WANDB_API_KEY is set, offline otherwise."""
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return setting


class WandbTracker:
    def __init__(self, cfg: Config, directory: Path, run_id: str | None):
        import wandb

        t = cfg.tracking
        mode = wandb_mode(t.wandb_mode)
        directory.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id or secrets.token_hex(4)
        self._run = wandb.init(
            project=t.project, entity=t.entity, group=t.group, tags=t.tags, name=cfg.name, id=self.run_id,
            resume="allow", mode=mode, dir=str(directory), config=cfg.model_dump(mode="json"),
            settings=wandb.Settings(save_code=False, disable_git=True, x_disable_stats=True,
                                    x_disable_meta=True, console="off"),
        )

    def log(self, metrics: dict, step: int) -> None:
        self._run.log(metrics, step=step)

    def finish(self) -> None:
        self._run.finish()


def make_tracker(cfg: Config, rank: int, directory: Path, run_id: str | None = None) -> Tracker:
    if rank != 0 or cfg.tracking.backend == "none":
        return NoOpTracker()
    return WandbTracker(cfg, directory, run_id)


def tracking_dir(cfg: Config) -> Path:
    """Where W&B keeps its files: the run folder, or for a run on S3 this node's cache."""
    run = cfg.run_location
    return node_cache("wandb", cfg.name) if run.remote else run.local() / "wandb"
