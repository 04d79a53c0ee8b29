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


def test_an_upward_import_inside_a_function_breaks_the_layers(copy):
    with open(copy / "llm_ray" / "storage.py", "a") as f:
        f.write("\n\ndef _upward():\n    from llm_ray.data import sources  # noqa: F401\n")
    done = lint(copy)
    assert done.returncode == 1, done.stdout
    assert "llm_ray.storage is not allowed to import llm_ray.data" in done.stdout


def test_a_cycle_between_two_modules_of_a_package_breaks_the_acyclic_contract(copy):
    # sweep.trial is imported by sweep.results; an import back closes a cycle inside llm_ray.sweep.
    with open(copy / "llm_ray" / "sweep" / "trial.py", "a") as f:
        f.write("\n\ndef _back():\n    from llm_ray.sweep import results  # noqa: F401\n")
    done = lint(copy)
    assert done.returncode == 1, done.stdout
    assert "No import cycles between the modules of any package BROKEN" in done.stdout
    assert ".trial -> .results" in done.stdout or ".results -> .trial" in done.stdout, done.stdout


def test_serving_may_not_import_training(copy):
    with open(copy / "llm_ray" / "serve" / "launch.py", "a") as f:
        f.write("\n\ndef _train():\n    from llm_ray.train import trainer  # noqa: F401\n")
    done = lint(copy)
    assert done.returncode == 1, done.stdout
    assert "llm_ray.serve is not allowed to import llm_ray.train" in done.stdout
    assert "llm_ray.serve.launch -> llm_ray.train.trainer" in done.stdout
