"""MFU of llm-ray pretraining `gpt2-124m` in bf16 on the GPUs of this machine (target: >= 45%
on H100/H200-class GPUs).

    python benchmarks/gpu_mfu.py [--steps 60] [--workers N] [--micro-batch 16] [--compile]

Trains the gpt2-124m preset (Ray Train + DeepSpeed ZeRO-1, bf16, one worker per GPU) on
random tokens for --steps optimizer steps with 4 accumulation steps per worker, and prints
tokens/s per GPU and MFU = FLOPs per token (PaLM formula, attention included) x tokens/s
against two peaks: the GPU's datasheet dense bf16 figure (when known) and a measured
8192^2 bf16 matmul. The first logging window (start-up, cuDNN/compile warm-up) is left out.
Needs a CUDA build of torch (see README, "GPU clusters and torch").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import steady_tokens_per_sec, synthetic_data  # noqa: E402

from llm_ray.config import load_config, model_spec  # noqa: E402
from llm_ray.model import GPT  # noqa: E402

# Dense bf16 tensor-core TFLOP/s from the vendor datasheets (SXM parts; no sparsity).
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)


def measured_peak_tflops(n: int = 8192, repeats: int = 50) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    tflops = 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12
    del a, b
    torch.cuda.empty_cache()  # leave the GPU to the training workers
    return tflops


def measure(steps: int, workers: int, micro_batch: int = 16, compile: bool = False, log=print) -> dict:
    """Train gpt2-124m on random tokens (bf16, ZeRO-1, one worker per GPU, 4 accumulation steps) and
    return its figures: tokens/s, MFU against each peak, the config and the run's TrainResult."""
    name = torch.cuda.get_device_name(0)
    peaks = {"measured 8192^2 bf16 matmul": measured_peak_tflops()}
    if (sheet := datasheet_peak(name)) is not None:
        peaks["datasheet dense bf16"] = sheet
    log(f"{workers} x {name}; peaks: " + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in peaks.items()))
    accum = 4
    overrides = [
        f"train.num_workers={workers}", "train.use_gpu=true", "train.cpus_per_worker=1",
        f"train.micro_batch_size={micro_batch}",
        f"train.total_batch_tokens={micro_batch * 1024 * workers * accum}",
        f"train.max_steps={steps}", "train.warmup_steps=10", "train.log_every=5",
        f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.eval_batches=1",
        f"train.compile={str(compile).lower()}",
    ]
    workdir = Path(tempfile.mkdtemp(prefix="llmray-gpu-bench-"))
    cfg = load_config("gpt2-124m", [f"output_dir={workdir}", "name=gpu-mfu", *overrides])
    with torch.device("meta"):  # shapes only
        flops = GPT(model_spec(cfg)).flops_per_token(cfg.data.block_size)
    data = synthetic_data(workdir / "data", cfg.vocab_size, cfg.data.block_size, blocks=4096)

    from llm_ray.ray_utils import init_ray
    from llm_ray.train.trainer import train

    init_ray()
    result = train(cfg, data, log=log)
    tokens_per_sec = steady_tokens_per_sec(result.history)
    per_gpu = tokens_per_sec / workers
    return {"cfg": cfg, "result": result, "accum": accum, "flops": flops, "tokens_per_sec": tokens_per_sec,
            "per_gpu": per_gpu, "mfu": {label: flops * per_gpu / (peak * 1e12) for label, peak in peaks.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--workers", type=int, default=None, help="GPUs to use (default: all)")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences of 1024 tokens per micro-batch")
    parser.add_argument("--compile", action="store_true", help="train with train.compile=true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: this benchmark needs one (and a CUDA build of torch)")
        return 2
    workers = args.workers or torch.cuda.device_count()
    m = measure(args.steps, workers, args.micro_batch, args.compile)
    cfg = m["cfg"]
    print(f"\ngpt2-124m, bf16, ZeRO-{cfg.train.zero_stage}, micro-batch {args.micro_batch} x 1024, "
          f"{m['accum']} accumulation steps, {'compiled' if args.compile else 'eager'}:")
    print(f"  {m['tokens_per_sec']:,.0f} tokens/s in all, {m['per_gpu']:,.0f} per GPU; {m['flops'] / 1e9:.2f} GFLOP/token")
    for label, mfu in m["mfu"].items():
        print(f"  MFU vs {label}: {mfu:.1%}")
    losses = [h["train_loss"] for h in m["result"].history if "train_loss" in h]
    print(f"  loss {losses[0]:.3f} -> {losses[-1]:.3f} (random tokens: ln({cfg.vocab_size}) = "
          f"{np.log(cfg.vocab_size):.3f} is the floor)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
