"""The README and docs/ name only what exists: `llm-ray` commands the CLI's parser has, config fields the
pydantic models have, repository files, and relative links and images that resolve (no Ray, no torch)."""

import argparse
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from llm_ray.cli import build_parser
from llm_ray.config.root import Config
from llm_ray.config.serve import ServeConfig
from llm_ray.config.sweep import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

CODE = re.compile(r"```.*?```|`[^`]+`", re.DOTALL)  # fenced blocks, inline code spans (may wrap a line)
COMMAND = re.compile(r"\bllm-ray[ \t]+([a-z][a-z-]*)(?=[\s`),.;]|$)")
DOTTED = re.compile(r"(?<![\w./<$-])([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+)(?![\w/(-])")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./~-])((?:llm_ray|benchmarks|tests|jobs|cluster|tuning|docs)/[\w./-]*)")
# A dotted name ending like this is a file (`eval.json`, `model.safetensors`), not a config field.
FILE_SUFFIXES = {"py", "md", "png", "json", "jsonl", "yaml", "yml", "csv", "txt", "parquet", "gz", "bz2", "zst",
                 "html", "npy", "safetensors", "toml", "pt", "bin", "cfg"}


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_spans(text: str) -> list[str]:
    return CODE.findall(text)


def sections(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The model's fields that are sections (pydantic models, also when optional), by name."""
    found = {}
    for name, field in model.model_fields.items():
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        for annotation in candidates:
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                found[name] = annotation
    return found


# Which model a dotted name starting with a section belongs to: the run config's sections, and those of
# the serve config and the sweep file (their own files, documented beside it).
ROOTS = {name: Config for name in sections(Config)}
ROOTS |= {name: ServeConfig for name in sections(ServeConfig)}
ROOTS |= {name: SweepConfig for name in sections(SweepConfig)}


def field_exists(model: type[BaseModel], parts: list[str]) -> bool:
    """Whether the dotted path (parts) walks model_fields from model, through nested sections."""
    for i, part in enumerate(parts):
        if part not in model.model_fields:
            return False
        if i < len(parts) - 1:
            nested = sections(model).get(part)
            if nested is None:
                return False  # a value, not a section, has no fields
            model = nested
    return True


def config_names(text: str) -> set[str]:
    """Dotted names in code that start with a known section, less file names."""
    names = set()
    for span in code_spans(text):
        for name in DOTTED.findall(span):
            parts = name.split(".")
            if parts[0] in ROOTS and parts[-1] not in FILE_SUFFIXES:
                names.add(name)
    return names


def commands(text: str) -> set[str]:
    return {m for span in code_spans(text) for m in COMMAND.findall(span)}


def parser_commands() -> set[str]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_command_named_is_one_the_cli_has(doc):
    named = commands(doc.read_text(encoding="utf-8"))
    assert not named - parser_commands(), f"{doc_id(doc)} names commands llm-ray lacks: {named - parser_commands()}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_config_field_named_exists(doc):
    names = config_names(doc.read_text(encoding="utf-8"))
    missing = sorted(n for n in names if not field_exists(ROOTS[n.split(".")[0]], n.split(".")))
    assert not missing, f"{doc_id(doc)} names config fields that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_relative_link_and_image_exists(doc):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        if not (doc.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{doc_id(doc)} links to missing files: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_repository_path_in_code_exists(doc):
    """`benchmarks/prepare_scale.py`, `llm_ray/train/data.py`...: a module moved or renamed leaves no stale name
    (a module may be named without .py, as `llm_ray/checkpoint` is a module or a package)."""
    paths = {p.rstrip(".") for span in code_spans(doc.read_text(encoding="utf-8")) for p in REPO_PATH.findall(span)}
    missing = sorted(p for p in paths if not (ROOT / p).exists() and not (ROOT / f"{p}.py").exists())
    assert not missing, f"{doc_id(doc)} names files that do not exist: {missing}"


def test_the_checks_see_what_the_docs_name():
    """The checks above are not vacuous: the pages name commands, fields and links, and a made-up field
    or command is caught."""
    text = "\n".join(d.read_text(encoding="utf-8") for d in DOCS)
    assert {"prepare", "train", "tune", "serve", "preflight"} <= commands(text)
    names = config_names(text)
    assert {"train.max_steps", "data.mb_per_task", "cleaning.pii.max_share", "limits.max_tokens",
            "search.algorithm"} <= names
    assert all(field_exists(ROOTS[n.split(".")[0]], n.split(".")) for n in
               ("train.max_steps", "data.s3.endpoint_url", "autoscaling.min_replicas"))
    fake = "`train.max_stepz` and `llm-ray trian --config demo` and `eval.json`"
    assert config_names(fake) == {"train.max_stepz"} and not field_exists(Config, ["train", "max_stepz"])
    assert commands(fake) == {"trian"} and "trian" not in parser_commands()
    assert len(DOCS) >= 9 and sum(len(LINK.findall(d.read_text(encoding="utf-8"))) for d in DOCS) >= 10
    assert {"benchmarks/train_throughput.py", "llm_ray/train/data.py"} <= {
        p for span in code_spans(text) for p in REPO_PATH.findall(span)}
