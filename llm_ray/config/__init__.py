"""Configuration: one pydantic model per component, composed at the root.

Every field has a description (it is the documentation), unknown keys are rejected,
and cross-field checks name the fields to change. ``load_config`` turns a preset name
or a YAML file plus ``--set dotted.path=value`` overrides into a validated ``Config``;
anything wrong raises ``ConfigError`` with a short message meant for the user.
"""

from llm_ray.config.base import ConfigError, Section
from llm_ray.config.data import (
    CleaningConfig,
    DataConfig,
    DedupConfig,
    S3Config,
    TokenizerConfig,
)
from llm_ray.config.eval import EvalConfig
from llm_ray.config.loading import (
    PRESETS,
    apply_override,
    dump_config,
    format_validation_error,
    load_config,
    model_spec,
    preset_path,
    read_source,
    set_path,
    validate,
)
from llm_ray.config.model import ModelConfig
from llm_ray.config.root import Config
from llm_ray.config.train import SampleConfig, TrackingConfig, TrainConfig

__all__ = ["Config", "ConfigError", "Section", "S3Config", "DataConfig", "DedupConfig", "CleaningConfig",
           "TokenizerConfig", "EvalConfig", "ModelConfig", "TrainConfig", "TrackingConfig", "SampleConfig", "PRESETS",
           "apply_override", "dump_config", "format_validation_error", "load_config", "model_spec",
           "preset_path", "read_source", "set_path", "validate"]
