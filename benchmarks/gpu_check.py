"""The GPU checks in one run (under 8 minutes on one GPU): MFU, the memory estimate, vLLM serving.

    bash benchmarks/gpu_check.sh        (python benchmarks/gpu_check.py [--steps 40] [--skip-vllm])

1. MFU: gpt2-124m in bf16 on one GPU (benchmarks/gpu_mfu.py's run: ZeRO-1, 16 x 1024 tokens per
   micro-batch, 4 accumulation steps, random tokens). Target: at least 45% of the datasheet's dense
   bf16 peak on H100/H200-class GPUs.
2. Memory: llm_ray.sweep.memory's estimate for that run against the peak torch.cuda.max_memory_allocated
   its worker reported. max_memory_allocated does not see the CUDA context, cuBLAS's workspace or
   NCCL's buffers, so the estimate is compared without its runtime allowance. Target: within 25%, as
   tests/test_memory.py holds the CPU estimate.
3. vLLM: the debug preset prepared and trained on the GPU, then `llm-ray serve --engine vllm` (Ray Serve
   LLM over the run's Hugging Face export) answering one /v1/completions request. Needs the `[vllm]`
   extra; without it the row says so.

Prints one table. Without a CUDA GPU it stops at once with a message (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_mfu import measure  # noqa: E402

from llm_ray.sweep.memory import estimate_memory  # noqa: E402

LLM_RAY = [sys.executable, "-m", "llm_ray.cli"]


def memory_row(cfg, history: list[dict]) -> tuple[str, str, str, str]:
    peaks = [h["memory_gb"] for h in history if "memory_gb" in h]
    estimate = estimate_memory(cfg)
    predicted = (estimate.total - estimate.runtime) / 1e9
    if not peaks:
        return ("memory estimate", f"estimate {predicted:.2f} GB; the run reported no peak", "within 25%", "MISS")
    measured = max(peaks)
    error = predicted / measured - 1
    return ("memory estimate vs max_memory_allocated",
            f"{predicted:.2f} GB estimated, {measured:.2f} GB measured ({error:+.0%})", "within 25%",
            "PASS" if abs(error) <= 0.25 else "MISS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, deadline: float, server: subprocess.Popen) -> bytes:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"llm-ray serve exited with {server.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"no answer from {url}")


def vllm_row(workdir: Path, budget_s: float) -> tuple[str, str, str, str]:
    if find_spec("vllm") is None:
        return ("vLLM serve (Ray Serve LLM)", "vllm is not installed: pip install -e '.[vllm]'", "answers", "SKIP")
    common = ["--config", "debug", "--set", f"output_dir={workdir}"]
    gpu = ["--set", "train.use_gpu=true", "--set", "train.num_workers=1"]
    for command in (["prepare", *common], ["train", *common, *gpu]):
        subprocess.run([*LLM_RAY, *command], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    log = workdir / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([*LLM_RAY, "serve", "--run", "debug", "--output-dir", str(workdir), "--engine", "vllm",
                                   "--set", f"port={port}"], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        started = time.monotonic()
        models = json.loads(wait_for(f"{base}/models", started + budget_s, server))
        model = models["data"][0]["id"]
        request = urllib.request.Request(f"{base}/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": model, "prompt": "ROMEO:", "max_tokens": 16}).encode())
        sent = time.monotonic()
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        text = answer["choices"][0]["text"]
        return ("vLLM serve (Ray Serve LLM)",
                f"{model} up in {sent - started:.0f} s; 16 tokens in {time.monotonic() - sent:.2f} s: {text[:30]!r}",
                "answers", "PASS" if answer["usage"]["completion_tokens"] > 0 else "MISS")
    except Exception as e:  # noqa: BLE001 - the row says what failed; the log has the rest
        return ("vLLM serve (Ray Serve LLM)", f"{type(e).__name__}: {e} (see {log})", "answers", "MISS")
    finally:
        server.send_signal(signal.SIGTERM)  # serve unwinds: the app, Serve and its local Ray stop
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the MFU run")
    parser.add_argument("--skip-vllm", action="store_true", help="leave out the vLLM serving check")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch on this machine, so there is nothing to check here. "
              "Run it on a GPU node with a CUDA build of torch (README, \"GPU clusters and torch\").")
        return 2
    started = time.monotonic()
    rows = []
    m = measure(args.steps, workers=1, log=lambda *a: None)
    sheet = m["mfu"].get("datasheet dense bf16")
    matmul = m["mfu"]["measured 8192^2 bf16 matmul"]
    against = "no datasheet figure for this GPU" if sheet is None else f"{sheet:.1%} of datasheet"
    rows.append(("gpt2-124m bf16 MFU, 1 GPU",
                 f"{m['per_gpu']:,.0f} tokens/s; {against}, {matmul:.1%} of a measured matmul",
                 ">= 45% (H100/H200)", "n/a" if sheet is None else "PASS" if sheet >= 0.45 else "MISS"))
    rows.append(memory_row(m["cfg"], m["result"].history))
    import ray

    ray.shutdown()  # the GPU goes to vLLM
    shutil.rmtree(m["cfg"].output_dir, ignore_errors=True)
    if args.skip_vllm:
        rows.append(("vLLM serve (Ray Serve LLM)", "--skip-vllm", "answers", "SKIP"))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="llmray-gpu-check-"))
        try:
            rows.append(vllm_row(workdir, budget_s=max(60.0, 420 - (time.monotonic() - started))))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    widths = [max(len(r[i]) for r in [("check", "figure", "target", "verdict"), *rows]) for i in range(4)]
    print(f"\n{torch.cuda.get_device_name(0)}, {time.monotonic() - started:.0f} s")
    for row in [("check", "figure", "target", "verdict"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return 1 if any(r[3] == "MISS" for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
