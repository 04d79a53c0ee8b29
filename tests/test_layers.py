"""The layers in pyproject.toml's import-linter contracts hold, and breaking them fails the check:
an upward import (storage, a leaf, importing data) and a cycle between two modules of one package,
each added to a temporary copy of the package."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(folder: Path) -> subprocess.CompletedProcess:
    # No cache: a copy's modules have the same names as the real ones.
    return subprocess.run([str(LINT), "--no-cache"], cwd=folder, capture_output=True, text=True, timeout=300)


@pytest.fixture
def copy(tmp_path):
    shutil.copytree(ROOT / "llm_ray", tmp_path / "llm_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_package_keeps_its_layers():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


def broken(copy: Path, module: str, imported: str) -> str:
    """lint-imports' report on the copy after `module` imports `imported` inside a function (it must fail)."""
    with open(copy / (module.replace(".", "/") + ".py"), "a") as f:
        f.write(f"\n\ndef _added():\n    import {imported}  # noqa: F401\n")
    done = lint(copy)
    assert done.returncode == 1, done.stdout
    return done.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers(copy):
    report = broken(copy, "llm_ray.storage.local", "llm_ray.data.sources")  # storage is the bottom layer
    assert "llm_ray.storage is not allowed to import llm_ray.data" in report


def test_a_cycle_between_two_modules_of_a_package_breaks_the_acyclic_contract(copy):
    # sweep.trial is imported by sweep.results; an import back closes a cycle inside llm_ray.sweep.
    report = broken(copy, "llm_ray.sweep.trial", "llm_ray.sweep.results")
    assert "No import cycles between the modules of any package BROKEN" in report
    assert ".trial -> .results" in report or ".results -> .trial" in report, report


def test_serving_may_not_import_training(copy):
    report = broken(copy, "llm_ray.serve.launch", "llm_ray.train.trainer")
    assert "llm_ray.serve is not allowed to import llm_ray.train" in report
    assert "llm_ray.serve.launch -> llm_ray.train.trainer" in report
