"""Benchmarks that can only measure on hardware this machine lacks still stop cleanly here."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU: this tests the stop without one (with a GPU the check runs for real, for minutes)")
def test_gpu_check_without_a_gpu_stops_with_a_message():
    """benchmarks/gpu_check.sh on a CPU-only machine: exit 2 and one line saying why, no traceback,
    before any Ray or training starts (seconds)."""
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=120, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                           "PYTHON": sys.executable})
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no CUDA GPU is visible" in run.stdout
    assert "Traceback" not in run.stderr


def test_gpu_check_memory_row_compares_without_the_runtime_allowance():
    """The memory row: the estimate less its runtime allowance (which max_memory_allocated cannot see)
    against the largest peak the run reported; a peak 25% or more off is a MISS."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import memory_row

    from llm_ray.config import load_config
    from llm_ray.sweep.memory import estimate_memory

    cfg = load_config("gpt2-124m", ["train.num_workers=1"])
    e = estimate_memory(cfg)
    expected = (e.weights + e.gradients + e.optimizer + e.buckets + e.transients + e.activations) / 1e9
    assert memory_row(cfg, [{"memory_gb": 1.0}, {"memory_gb": expected}])[3] == "PASS"
    assert f"{expected:.2f} GB estimated" in memory_row(cfg, [{"memory_gb": expected}])[1]
    assert memory_row(cfg, [{"memory_gb": expected * 1.5}])[3] == "MISS"
    assert memory_row(cfg, [])[3] == "MISS"


def test_speedrun_curve_and_time_to_target_by_hand():
    """The speedrun benchmark's time axis is the sum of the progress rows' training seconds before each
    evaluation, its bits per byte val_loss / ln 2 / bytes per token, and the target's time is linear
    between the evaluations around the crossing."""
    import math

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speedrun import curve, time_to

    ln2 = math.log(2)
    history = [{"step": 0, "val_loss": 4 * ln2},
               {"step": 10, "train_loss": 9.0, "train_seconds": 5.0, "eval_seconds": 99.0},
               {"step": 10, "val_loss": 3 * ln2},
               {"step": 20, "train_loss": 8.0, "train_seconds": 7.0},
               {"step": 20, "val_loss": 2 * ln2}]
    points = curve(history, bytes_per_token=2.0)  # bits per byte: 2, 1.5, 1
    assert points == [(0.0, 2.0), (5.0, 1.5), (12.0, 1.0)]
    assert time_to(1.25, points) == 5.0 + 7.0 * 0.5
    assert time_to(1.5, points) == 5.0
    assert time_to(0.9, points) is None
