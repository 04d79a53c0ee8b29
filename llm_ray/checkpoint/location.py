"""Where a run's checkpoints live: train.storage_path, else <output_dir>/<name>/checkpoints."""

from __future__ import annotations

from llm_ray.config import Config, ConfigError
from llm_ray.storage import Location, StorageError


def checkpoint_location(cfg: Config) -> tuple[Location, str]:
    """Where Ray Train keeps checkpoints (train.storage_path, else <output_dir>/<name>/checkpoints) and
    the config field that named it."""
    if cfg.train.storage_path is None:
        return cfg.run_location / "checkpoints", "output_dir"
    try:  # rejects other schemes, '..' segments, credentials in the URI
        return Location.parse(cfg.train.storage_path, cfg.data.s3, "train.storage_path"), "train.storage_path"
    except StorageError as e:  # a config value, so the config error's exit code
        raise ConfigError(str(e)) from None
