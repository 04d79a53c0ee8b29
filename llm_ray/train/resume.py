"""Resuming a run: what a checkpoint was written with, and the resumes that must be refused."""

from __future__ import annotations

from pathlib import Path

from llm_ray.checkpoint import MODEL_DIR
from llm_ray.config import Config
from llm_ray.train.loop import TrainState


def read_saved_config(checkpoint_dir: str) -> dict:
    """The resolved config a checkpoint was written with, as a plain dict."""
    import yaml

    return yaml.safe_load((Path(checkpoint_dir) / MODEL_DIR / "config.yaml").read_text(encoding="utf-8"))



def check_resumable(saved: TrainState, saved_config: dict, cfg: Config, data_key: str | None, world: int) -> None:
    """Refuse, with the field to change, a resume that would fail deep in DeepSpeed or silently
    train on the wrong thing."""
    stage = saved_config.get("train", {}).get("zero_stage", cfg.train.zero_stage)
    if stage != cfg.train.zero_stage:
        raise ValueError(f"the checkpoint at step {saved.step} was written at ZeRO-{stage}: resume with "
                         f"train.zero_stage={stage}, or start a new run (--set name=...)")
    if stage == 3 and saved.world_size not in (0, world):
        # DeepSpeed's universal conversion loads, but the re-partitioned ZeRO-3 optimizer state
        # did not reproduce the uninterrupted run in our test (ZeRO-2's does, to 6 decimals).
        raise ValueError(f"the ZeRO-3 checkpoint at step {saved.step} was written by {saved.world_size} workers: "
                         f"resume it with train.num_workers={saved.world_size} (not {world})")
    if saved.data_key is not None and saved.data_key != data_key:
        raise ValueError(f"the checkpoint at step {saved.step} was trained on other prepared data (it was "
                         "prepared again since): its data position means nothing here. Start a new run "
                         "(--set name=...) or train on the data it was trained on (--data)")
