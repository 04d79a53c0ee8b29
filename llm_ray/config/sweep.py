"""A sweep file (`llm-ray tune --sweep tuning/<name>.yaml`): base config, fixed overrides,
objective, search space, searcher and scheduler.

The search space maps dotted config paths to a small expression language:

    train.lr: loguniform(1e-4, 3e-2)      # floats, log scale
    train.warmup_steps: randint(0, 40)    # integers, both ends included
    model.n_layer: choice([2, 4, 6])      # any values: numbers, words, true/false
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from llm_ray.config.base import ConfigError, Section
from llm_ray.config.loading import format_validation_error, read_yaml
from llm_ray.config.root import Config

RANGES = {"uniform": float, "loguniform": float, "randint": int, "lograndint": int}
# Set per trial by the sweep itself: searching over them would break the sweep's bookkeeping.
RESERVED = {"name", "output_dir", "tracking.group"}
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: a range (kind in RANGES) or a choice among values."""

    path: str
    kind: str  # uniform, loguniform, randint, lograndint or choice
    low: float | int | None = None
    high: float | int | None = None
    values: tuple = ()


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as text; the sweep language means the number."""
    if isinstance(value, str) and NUMBER.match(value.strip()):
        text = value.strip()
        return float(text) if any(c in text for c in ".eE") else int(text)
    return value


def config_field(path: str):
    """The pydantic field a dotted path names in Config, or a ConfigError saying what exists."""
    model: Any = Config
    parts = path.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            raise ConfigError(f"space.{path}: {'.'.join(parts[:i + 1])} is not a config field; allowed here: "
                              f"{', '.join(sorted(model.model_fields))}")
        is_section = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        if i < len(parts) - 1:
            if not is_section:
                raise ConfigError(f"space.{path}: {'.'.join(parts[:i + 1])} is a value, not a section")
            model = field.annotation
        elif is_section:
            raise ConfigError(f"space.{path}: is a section; search over one of its fields "
                              f"({', '.join(sorted(field.annotation.model_fields))})")
    return field


def parse_dimension(path: str, expression: Any) -> Dimension:
    """'loguniform(1e-4, 3e-2)' and friends, checked, for the config field at path."""
    where = f"space.{path}"
    if path in RESERVED:
        raise ConfigError(f"{where}: set by the sweep for every trial; it cannot be searched")
    config_field(path)
    match = re.fullmatch(r"\s*([a-z]+)\s*\((.*)\)\s*", expression) if isinstance(expression, str) else None
    if match is None:
        raise ConfigError(f"{where}: {expression!r} is not a search expression; write "
                          "uniform(a, b), loguniform(a, b), randint(a, b), lograndint(a, b) or choice([v1, v2, ...])")
    kind, inner = match.groups()
    try:
        args = yaml.safe_load(f"[{inner}]")
    except yaml.YAMLError:
        raise ConfigError(f"{where}: cannot read the arguments of {expression!r}") from None
    if kind == "choice":
        if len(args) != 1 or not isinstance(args[0], list) or not args[0]:
            raise ConfigError(f"{where}: choice takes one non-empty list, e.g. choice([2, 4, 6]) (got {expression!r})")
        values = tuple(_number(v) for v in args[0])
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: choice lists a value twice ({expression!r})")
        return Dimension(path, "choice", values=values)
    if kind not in RANGES:
        raise ConfigError(f"{where}: unknown function {kind!r}; allowed: {', '.join([*RANGES, 'choice'])}")
    cast = RANGES[kind]
    args = [_number(a) for a in args]
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}: {kind} takes two numbers, low and high (got {expression!r})")
    if cast is int and not all(float(a).is_integer() for a in args):
        raise ConfigError(f"{where}: {kind} takes whole numbers (got {expression!r})")
    low, high = cast(args[0]), cast(args[1])
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    if kind.startswith("log") and low <= 0:
        raise ConfigError(f"{where}: {kind} needs a positive low end (got {low})")
    return Dimension(path, kind, low=low, high=high)


class SearchConfig(Section):
    algorithm: Literal["bayes", "tpe", "random", "grid"] = Field(
        "bayes", description="bayes: Gaussian-process Bayesian optimization (Optuna's GPSampler; floats, integers "
        "and choices); tpe: Optuna's tree-structured Parzen estimator; random; grid: every combination of "
        "the choice([...]) values (ranges are not allowed)."
    )
    num_samples: int | None = Field(
        None, ge=1, description="Trials to run (null: 8); with grid, how many times to run the whole grid (null: once)."
    )
    max_concurrent_trials: int = Field(1, ge=1, description="Trials running at once, each with its own workers.")
    startup_trials: int = Field(
        3, ge=1, description="Random trials before bayes and tpe start modelling the objective."
    )
    seed: int | None = Field(0, description="Seed of the searcher; null draws a fresh one.")


    @property
    def trials(self) -> int:
        return self.num_samples or (1 if self.algorithm == "grid" else 8)


class SchedulerConfig(Section):
    kind: Literal["none", "asha"] = Field(
        "none", description="asha stops trials whose objective trails their peers' at the same point (rungs)."
    )
    time_attr: Literal["step", "tokens"] = Field(
        "step", description="The fidelity ASHA compares trials at: optimizer steps or training tokens seen."
    )
    grace_period: int = Field(
        20, ge=1, description="Steps (or tokens) every trial runs before it can be stopped; pick a multiple of "
        "train.eval_every, since trials report at each evaluation."
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps the best 1/reduction_factor at each rung.")


class SweepConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="Sweep name: results go to <output_dir>/<name>; "
                      "it is also the W&B group of every trial.")
    base: str = Field("debug", description="The config every trial starts from: a preset or a YAML file "
                      "(relative to the sweep file).")
    overrides: list[str] = Field(default_factory=list, description="Fixed 'section.field=value' overrides, as "
                                 "with --set, applied to the base before the searched values.")
    objective: Literal["val_loss", "bits_per_byte"] = Field(
        "val_loss", description="Minimized: the last validation loss, or bits per byte of the held-out "
        "documents (eval.split) from `llm-ray eval` after training."
    )
    space: dict[str, Any] = Field(description="Dotted config path -> search expression.")
    search: SearchConfig = Field(default_factory=SearchConfig, description="Searcher and trial counts.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Early stopping.")
    memory_per_worker_gb: float | None = Field(
        None, gt=0, description="Memory one training worker may use (GPU memory with train.use_gpu, else host "
        "memory); trials estimated above it are skipped. null: measured from the cluster."
    )
    output_dir: str | None = Field(None, description="Where <name>/ goes; null: the base config's output_dir.")

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, Any]) -> dict[str, Any]:
        if not space:
            raise ValueError("name at least one parameter to search, e.g. train.lr: loguniform(1e-4, 3e-2)")
        return space

    @model_validator(mode="after")
    def _grid_and_asha(self):
        dims = self.dimensions()
        if self.search.algorithm == "grid":
            ranges = [d.path for d in dims if d.kind != "choice"]
            if ranges:
                raise ValueError(f"search.algorithm grid needs choice([...]) for every parameter; "
                                 f"{', '.join(ranges)} {'is a range' if len(ranges) == 1 else 'are ranges'}")
        if self.scheduler.kind == "asha" and self.objective != "val_loss":
            raise ValueError("scheduler.kind asha compares the validation loss during training; objective "
                             f"{self.objective} is measured once, after training: use scheduler.kind none")
        return self

    def dimensions(self) -> list[Dimension]:
        return [parse_dimension(path, expr) for path, expr in self.space.items()]


def load_sweep(path: str | Path) -> tuple[SweepConfig, Path]:
    """The sweep file, validated, and the folder its relative base path is read from."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"sweep file {file} does not exist")
    tree = read_yaml(file)
    try:
        sweep = SweepConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"{file}: " + format_validation_error(e, SweepConfig).replace(
            "invalid configuration", "invalid sweep", 1)) from None
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    return sweep, file.resolve().parent
