"""Training throughput, MFU and memory of llm-ray against a plain PyTorch loop, in one run.

    python benchmarks/train_throughput.py [--steps 30]

Prints, on this machine's cores:
  1. the matmul peak (2048^2, fp32 and bf16), the denominator of MFU;
  2. the `demo` model: a plain single-process PyTorch loop vs llm-ray (Ray Train + DeepSpeed
     ZeRO-2, 1 worker, same micro-batch, same threads): tokens/s and their ratio; fp32 and
     bf16 autocast;
  3. nanoGPT's CPU "baby GPT" shape (4 layers, 4 heads, width 128, block 64, batch 12,
     vocab 65): plain-loop tokens/s with llm-ray's model, fp32 and bf16 autocast, beside
     nanoGPT's 15,000 tokens/s measured on this machine type (a fixed reference: nanoGPT is
     not installed here);
  4. peak memory per worker (RSS) at ZeRO-0 vs ZeRO-3 with optimizer and parameter offload,
     2 workers, same model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llm_ray.config import load_config, model_spec
from llm_ray.model import GPT, GPTSpec

NANOGPT_BABY_TOKENS_PER_SEC = 15_000  # nanoGPT's README command on a 2-core machine of this type, 2026-11


def matmul_peak_tflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def plain_loop_tokens_per_sec(spec: GPTSpec, batch: int, steps: int, autocast: bool) -> float:
    """The reference: model, AdamW and a for loop in one process, no Ray, no DeepSpeed."""
    torch.manual_seed(0)
    model = GPT(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, spec.vocab_size, (batch, spec.context_length + 1))
    for step in range(steps + 3):
        if step == 3:  # after warm-up
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch * spec.context_length / (time.perf_counter() - start)


def synthetic_data(folder: Path, vocab: int, block: int, blocks: int) -> Path:
    """A prepared-data folder of random tokens: throughput does not depend on the text."""
    from llm_ray.data.tokenizer import train_bpe

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer").mkdir(exist_ok=True)
    train_bpe(["some text for a tokenizer file"] * 10, 300, 1, 10**6).save(str(folder / "tokenizer" / "tokenizer.json"))
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", blocks), ("val", 64)):
        np.save(folder / f"{split}.npy", rng.integers(0, vocab, (n, block + 1), dtype=np.uint16))
        splits[split] = {"shards": [{"file": f"{split}.npy", "blocks": n}], "blocks": n, "tokens": n * block}
    manifest = {"block_size": block, "vocab_size": 300, "tokenizer": "tokenizer/tokenizer.json", "splits": splits,
                "unigram_val_loss": float(np.log(vocab))}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def llm_ray_run(overrides: list[str], data: Path, workdir: Path) -> list[dict]:
    from llm_ray.train.trainer import train

    cfg = load_config("demo", [f"output_dir={workdir}", *overrides])
    return train(cfg, data, log=lambda *_: None).history


def steady_tokens_per_sec(history: list[dict]) -> float:
    rows = [h["tokens_per_sec"] for h in history if "tokens_per_sec" in h]
    return float(np.median(rows[1:] if len(rows) > 1 else rows))  # the first window includes start-up


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per measurement")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    workdir = Path(tempfile.mkdtemp(prefix="llmray-train-bench-"))

    peak = {name: matmul_peak_tflops(dt) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"matmul peak on {cores} cores: fp32 {peak['fp32']:.2f} TFLOP/s, bf16 {peak['bf16']:.2f} TFLOP/s")

    demo = load_config("demo", ["train.num_workers=1", "train.total_batch_tokens=2048"])
    spec = model_spec(demo)
    flops = GPT(spec).flops_per_token()
    batch = demo.train.micro_batch_size
    from llm_ray.ray_utils import init_ray

    init_ray(num_cpus=cores)
    data = synthetic_data(workdir / "data", spec.vocab_size, demo.data.block_size, blocks=4096)
    print(f"\ndemo model ({GPT(spec).num_params() / 1e6:.1f}M parameters, {flops / 1e6:.0f} MFLOP/token), "
          f"micro-batch {batch} x {demo.data.block_size}, {args.steps} steps")
    for autocast in (False, True):
        label = "bf16 autocast" if autocast else "fp32"
        plain = plain_loop_tokens_per_sec(spec, batch, args.steps, autocast)
        history = llm_ray_run(
            ["name=bench-" + label.replace(" ", "-"), "train.num_workers=1", "train.cpus_per_worker=1",
             f"train.torch_threads={cores}", "train.total_batch_tokens=2048", f"train.max_steps={args.steps}",
             "train.log_every=5", f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}",
             "train.eval_batches=1", f"train.autocast_bf16={str(autocast).lower()}"], data, workdir)
        ours = steady_tokens_per_sec(history)
        p = peak["bf16" if autocast else "fp32"]
        print(f"  {label:<14} plain loop {plain:8,.0f} tok/s | llm-ray {ours:8,.0f} tok/s | ratio "
              f"{ours / plain:.2f} | MFU plain {flops * plain / (p * 1e12):.1%}, llm-ray {flops * ours / (p * 1e12):.1%}")

    baby = GPTSpec(vocab_size=65, context_length=64, n_layer=4, n_head=4, n_embd=128)
    print("\nnanoGPT baby GPT shape (4 layers, 4 heads, 128 wide, block 64, batch 12, vocab 65), plain loop:")
    for autocast in (False, True):
        tps = plain_loop_tokens_per_sec(baby, 12, args.steps * 5, autocast)
        print(f"  {'bf16 autocast' if autocast else 'fp32':<14} {tps:8,.0f} tok/s = "
              f"{tps / NANOGPT_BABY_TOKENS_PER_SEC:.2f}x nanoGPT's {NANOGPT_BABY_TOKENS_PER_SEC:,} tok/s")

    print("\npeak memory per worker, 2 workers, demo model:")
    for label, extra in (("ZeRO-0", ["train.zero_stage=0"]),
                         ("ZeRO-3 + offload", ["train.zero_stage=3", "train.offload_optimizer=true",
                                               "train.offload_params=true"])):
        history = llm_ray_run(["name=mem-" + label.split()[0], "train.max_steps=10", "train.log_every=5",
                               "train.eval_every=10", "train.checkpoint_every=10", "train.eval_batches=1", *extra],
                              data, workdir)
        print(f"  {label:<18} {max(h.get('memory_gb', 0) for h in history):.2f} GB (rank 0 RSS)")


if __name__ == "__main__":
    main()
