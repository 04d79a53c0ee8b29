"""Resuming a run: refusing, naming the field, a resume that would silently train on something else
(another seed, data order, block size or tokenizer) or fail deep inside DeepSpeed. Which checkpoint
to resume from is checkpoint.manifest's (the newest complete one).

DeepSpeed's resume files are pickles (``torch.load`` of optimizer state): whoever can write
to the checkpoint storage can run code on the workers. Keep it as trusted as the code.
"""

from __future__ import annotations

from pathlib import Path

from llm_ray.checkpoint.state import TrainState
from llm_ray.config import Config, ConfigError


# ------------------------------------------------------------------ refusals


def _get(tree: dict, dotted: str, default):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def regroups(ds_tag_dir: str | Path, saved_world: int, world: int) -> bool:
    """Whether the checkpoint's optimizer state is sharded over its workers (ZeRO 1-3, DeepSpeed's
    partitioned bf16 optimizer: per-worker *optim_states.pt files) and their number changed, so
    that it must be re-partitioned. Decided from the files, not the config: at ZeRO-0, DeepSpeed
    0.19 keeps bf16's fp32 master weights whole in the model states file."""
    sharded = any(Path(ds_tag_dir).glob("*optim_states.pt"))
    return sharded and saved_world not in (0, world)


def check_resumable(saved: TrainState, saved_config: dict, cfg: Config, data_key: str | None, world: int,
                    tokenizer_json: str | None = None, saved_tokenizer: str | None = None) -> None:
    """Raise ConfigError, naming the field to change, for a resume that would fail deep in DeepSpeed
    or silently train on something else than the checkpoint's run did."""
    at = f"the checkpoint at step {saved.step}"
    fresh = "or start a new run (--set name=...)"
    stage = _get(saved_config, "train.zero_stage", cfg.train.zero_stage)
    if stage != cfg.train.zero_stage:
        raise ConfigError(f"{at} was written at ZeRO-{stage}: resume with train.zero_stage={stage}, {fresh}")
    order = "the data order and position it recorded would mean other blocks"
    for dotted, now, why in (("seed", cfg.seed, order), ("train.shuffle", cfg.train.shuffle, order),
                             ("data.block_size", cfg.data.block_size, order),
                             ("train.precision", cfg.train.precision, "DeepSpeed's optimizer state has another form")):
        then = _get(saved_config, dotted, now)
        if then != now:
            raise ConfigError(f"{at} was written with {dotted}={then} (now {now}): {why}; resume with "
                              f"{dotted}={then}, {fresh}")
    if saved_tokenizer is not None and tokenizer_json is not None and saved_tokenizer != tokenizer_json:
        raise ConfigError(f"{at} was trained with another tokenizer than the prepared data's (tokenizer.*, or "
                          f"data prepared again): token ids would mean other text; {fresh[3:]}")
    if stage == 3 and saved.world_size not in (0, world):
        # DeepSpeed's universal conversion loads, but the re-partitioned ZeRO-3 optimizer state
        # did not reproduce the uninterrupted run in our test (ZeRO-2's does, to 6 decimals).
        raise ConfigError(f"the ZeRO-3 {at[4:]} was written by {saved.world_size} workers: resume it with "
                          f"train.num_workers={saved.world_size} (not {world}), {fresh}")
    if saved.data_key is not None and saved.data_key != data_key:
        raise ConfigError(f"{at} was trained on other prepared data (it was prepared again since): its data "
                          f"position means nothing here. Train on the data it was trained on (--data), {fresh}")
