"""Loading configs: a preset or YAML file, dotted overrides, validation with messages that name the field."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llm_ray.config.base import ConfigError
from llm_ray.config.root import Config
from llm_ray.storage import as_location

PRESETS = ("debug", "demo", "speedrun", "gpt2-124m")


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping, with errors that name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def preset_path(name: str) -> Path:
    return Path(str(resources.files("llm_ray") / "presets" / f"{name}.yaml"))


def read_source(name_or_path: str) -> dict[str, Any]:
    """The raw tree of a preset or YAML file, before overrides and validation."""
    if name_or_path in PRESETS:
        return read_yaml(preset_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return read_yaml(path)
    raise ConfigError(f"unknown config {name_or_path!r}: give a preset ({', '.join(PRESETS)}) or a .yaml file")


def _is_text_field(parts: list[str], root: type[BaseModel]) -> bool:
    """Whether the dotted path names a string field (str or str | None) of root."""
    model: Any = root
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return False
        model = field.annotation
    field = model.model_fields.get(parts[-1])
    return field is not None and field.annotation in (str, str | None)


def apply_override(tree: dict[str, Any], assignment: str, root: type[BaseModel] = Config) -> None:
    """Apply one 'dotted.path=value' override in place. The value is parsed as YAML, except for
    string fields, which take the text as written (``name=2024`` is the name "2024", not a number)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} must look like section.field=value")
    parts = key.split(".")
    if _is_text_field(parts, root) and raw.strip() not in ("", "null", "~"):
        value: Any = raw.strip()
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, RecursionError):
            value = raw
    set_path(tree, key, value, f"override {key}")


def set_path(tree: dict[str, Any], key: str, value: Any, where: str | None = None) -> None:
    """tree[a][b][c] = value for key 'a.b.c', creating sections on the way."""
    node: Any = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where or key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _field_names(loc: tuple, root: type[BaseModel] = Config) -> list[str]:
    model: Any = root
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def format_validation_error(err: ValidationError, root: type[BaseModel] = Config) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _field_names(e["loc"], root)
            lines.append(f"{path}: unknown field; allowed here: {', '.join(allowed)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"].startswith("literal_error") or e["type"] in ("enum",):
            msg = msg.replace("Input should be", "allowed:")
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{path}: {msg}{shown}" if path else msg)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def validate(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(name_or_path: str = "demo", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset name or YAML path, plus dotted overrides, validated into a Config."""
    tree = read_source(name_or_path)
    for assignment in overrides:
        apply_override(tree, assignment)
    return validate(tree)


def dump_config(cfg: Config, path) -> None:
    """Write the fully resolved config (every field, defaults included) as YAML to a local path or a
    storage Location (S3 too)."""
    as_location(path, cfg.data.s3, "output_dir").write_text(yaml.safe_dump(cfg.model_dump(mode="json"),
                                                                          sort_keys=False))


def model_spec(cfg: Config):
    """The architecture the config describes, as the model package's GPTSpec."""
    from llm_ray.model import GPTSpec  # torch: loaded only where a model is built, not by every command

    m = cfg.model
    return GPTSpec(
        vocab_size=cfg.vocab_size,
        context_length=m.context_length,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        pos_encoding=m.pos_encoding,
        norm=m.norm,
        mlp=m.mlp,
        dropout=m.dropout,
        bias=m.bias,
        qk_norm=m.qk_norm,
        logit_softcap=m.logit_softcap,
        tie_embeddings=m.tie_embeddings,
    )
