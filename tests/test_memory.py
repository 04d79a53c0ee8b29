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
    allowance stands for that starting point."""
    run = subprocess.run([sys.executable, str(PROBE), "debug", *COMMON, *VARIANTS[variant]], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    measured, estimated = result["measured"], result["estimated"]
    assert measured > 300e6, result  # the model and activations, not the runtime, dominate the measurement
    assert abs(estimated - measured) <= TOLERANCE * measured, (variant, measured / 1e6, estimated / 1e6)
