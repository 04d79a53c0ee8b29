"""The memory pre-flight's estimate against the peak memory of real DeepSpeed training steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROBE = Path(__file__).parent / "_memory_probe.py"
TOLERANCE = 0.25  # stated in llm_ray/sweep/memory.py
COMMON = ["model.n_embd=512", "model.n_head=8", "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2",
          "train.warmup_steps=1", "train.eval_batches=1"]
VARIANTS = {
    # fp32 weights, AdamW, ZeRO-0, activations kept for every layer
    "fp32-adamw-zero0": ["model.n_layer=4", "train.micro_batch_size=16", "train.total_batch_tokens=1024",
                         "train.zero_stage=0", "train.precision=fp32", "train.optimizer=adamw"],
    # DeepSpeed bf16 with fp32 master weights, SGD, ZeRO-2, activation checkpointing, a large micro-batch
    "bf16-sgd-zero2-checkpointed": ["model.n_layer=6", "train.micro_batch_size=32", "train.total_batch_tokens=2048",
                                    "train.zero_stage=2", "train.precision=bf16", "train.optimizer=sgd",
                                    "train.activation_checkpointing=true"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_estimate_is_within_tolerance_of_the_measured_peak(variant):
    """Measured: the process's peak resident memory during a few training steps (and an
    evaluation), minus its resident memory before the model was built; the estimate's runtime
    allowance stands for that starting point (held against a Ray Train worker's memory below)."""
    run = subprocess.run([sys.executable, str(PROBE), "debug", *COMMON, *VARIANTS[variant]], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    measured, estimated = result["measured"], result["estimated"]
    assert measured > 300e6, result  # the model and activations, not the runtime, dominate the measurement
    assert abs(estimated - measured) <= TOLERANCE * measured, (variant, measured / 1e6, estimated / 1e6)


@pytest.mark.integration
def test_runtime_allowance_is_within_tolerance_of_a_ray_train_workers_peak(ray_session, tmp_path):
    """The debug model's weights, gradients, optimizer state and activations come to about 14 MB: the
    peak resident memory a Ray Train worker reports for it (memory_gb in the run's history) is the
    runtime (Python, torch, DeepSpeed, Ray), which the estimate's total must match."""
    from llm_ray.data.prepare import data_dir, prepare
    from llm_ray.sweep.memory import estimate_memory
    from llm_ray.train.trainer import train
    from tests.conftest import CORPUS, debug_config

    cfg = debug_config(tmp_path, CORPUS, "train.num_workers=1", "train.max_steps=10", "train.eval_every=10",
                       "train.checkpoint_every=10", "train.log_every=5")
    prepare(cfg, log=lambda *_: None)
    history = train(cfg, data_dir(cfg), log=lambda *_: None).history
    measured = max(h["memory_gb"] for h in history if "memory_gb" in h) * 1e9
    estimate = estimate_memory(cfg)
    assert estimate.total - estimate.runtime < 0.05 * measured, estimate  # the runtime is what is measured
    assert abs(estimate.total - measured) <= TOLERANCE * measured, (measured / 1e6, estimate.total / 1e6)
