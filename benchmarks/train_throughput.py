"""Training throughput, MFU and memory of llm-ray against a plain PyTorch loop, in one run.

    python benchmarks/train_throughput.py [--steps 60] [--repeats 3] [--skip-compile] [--overhead-only]

Prints, on this machine's cores:
  1. the matmul peak (2048^2, fp32 and bf16), the denominator of MFU;
  2. the overhead of Ray Train + DeepSpeed, on the `demo` model: a plain single-process PyTorch
     loop (same model, llm-ray's optimizer, same micro-batch and threads) vs llm-ray (1 worker):
     fp32 at ZeRO-0 (one worker has nothing to partition) and ZeRO-2, bf16 autocast, and
     torch.compile; then 2 workers at ZeRO-2 (the default) vs a plain 2-process DDP loop over gloo
     (benchmarks/_plain_ddp.py), one thread per process. The two sides alternate --repeats times
     (this machine is shared: a slow minute hits one pair, not one side) and the ratio printed is
     the median of the pairs' ratios, with their range;
  3. nanoGPT's CPU "baby GPT" shape (4 layers, 4 heads, width 128, block 64, batch 12,
     vocab 65, fp32): tokens/s of the plain loop with llm-ray's model and optimizer and of
     llm-ray itself, beside nanoGPT's 15,000 tokens/s measured on this machine type (a fixed
     reference: nanoGPT is not installed here); bf16 autocast and compile separately;
  4. peak memory per worker (RSS), 2 workers, a ~60M-parameter model: ZeRO-0 (every worker
     holds all states) vs ZeRO-3 (partitioned) vs ZeRO-3 with optimizer and parameter offload.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llm_ray.checkpoint import read_train_state
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


def plain_loop_tokens_per_sec(spec: GPTSpec, batch: int, steps: int, autocast: bool, compile: bool = False) -> float:
    """The reference: model, llm-ray's optimizer (fused AdamW, no-decay groups) and a for loop in one
    process; no Ray, no DeepSpeed."""
    from llm_ray.config import TrainConfig
    from llm_ray.train.engine import build_optimizer, param_groups

    torch.manual_seed(0)
    model = GPT(spec)
    t = TrainConfig()
    opt = build_optimizer(param_groups(model, t.weight_decay), t)
    forward = torch.compile(model) if compile else model
    data = torch.randint(0, spec.vocab_size, (batch, spec.context_length + 1))
    warmup = 5 if compile else 3
    for step in range(steps + warmup):
        if step == warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = forward(data[:, :-1], data[:, 1:])
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
    manifest = {"block_size": block, "vocab_size": min(vocab, 300), "tokenizer": "tokenizer/tokenizer.json", "splits": splits,
                "unigram_val_loss": float(np.log(vocab))}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# What the plain loops do (TrainConfig's AdamW, gradients clipped at 1, fp32 unless a row says bf16):
# the demo preset's Muon and bf16 "auto" would make the two sides train differently.
AS_PLAIN = ["train.optimizer=adamw", "train.grad_clip=1.0", "train.autocast_bf16=false"]


def llm_ray_run(overrides: list[str], data: Path, workdir: Path):
    """The TrainResult of a run of the demo preset's model with overrides, trained as the plain loops train."""
    from llm_ray.train.trainer import train

    cfg = load_config("demo", [f"output_dir={workdir}", *AS_PLAIN, *overrides])
    return train(cfg, data, log=lambda *_: None)


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label)


def one_worker(name: str, steps: int, cores: int, *extra: str) -> list[str]:
    """Overrides for a timed llm-ray run on one worker with every core."""
    return [f"name={name}", "train.num_workers=1", "train.cpus_per_worker=1", f"train.torch_threads={cores}",
            f"train.max_steps={steps}", "train.log_every=5", f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}", "train.eval_batches=1", *extra]


def steady_tokens_per_sec(history: list[dict]) -> float:
    rows = [h["tokens_per_sec"] for h in history if "tokens_per_sec" in h]
    return float(np.median(rows[1:] if len(rows) > 1 else rows))  # the first window includes start-up


def memory_rows(data: Path, workdir: Path) -> None:
    """Peak memory per worker and parameters held per worker, 2 workers, ZeRO-0 vs ZeRO-3 (+ offload)."""
    # Memory: a model big enough that its states (fp32 weights, gradients, two Adam moments:
    # 16 bytes per parameter) stand out from each worker's ~1 GB of torch, DeepSpeed and Ray.
    big = ["model.n_layer=8", "model.n_head=8", "model.n_embd=768", "train.micro_batch_size=2",
           "train.total_batch_tokens=512", "train.max_steps=3", "train.log_every=1", "train.eval_every=3",
           "train.checkpoint_every=3", "train.eval_batches=1"]
    params = GPT(model_spec(load_config("demo", big))).num_params()
    print(f"\npeak memory per worker (RSS), 2 workers, {params / 1e6:.0f}M-parameter model "
          f"({16 * params / 1e9:.2f} GB of weights, gradients and Adam state in all):")
    baseline = base_speed = None
    for label, extra in (("ZeRO-0", ["train.zero_stage=0"]), ("ZeRO-3", ["train.zero_stage=3"]),
                         ("ZeRO-3 + offload", ["train.zero_stage=3", "train.offload_optimizer=true",
                                               "train.offload_params=true"])):
        result = llm_ray_run(["name=mem-" + slug(label), *big, *extra], data, workdir)
        peak_gb = max(h.get("memory_gb", 0) for h in result.history)
        baseline = baseline or peak_gb
        state = read_train_state(result.checkpoint)
        held = state.get("parameters_held") or []
        share = f"{max(held) / state['parameters']:.1%}" if held and state.get("parameters") else "-"
        speed = steady_tokens_per_sec(result.history)
        base_speed = base_speed or speed
        print(f"  {label:<18} {peak_gb:.2f} GB (rank 0 peak RSS) = {peak_gb / baseline:.2f}x ZeRO-0's | "
              f"parameters held per worker after building: {share} of the model | {speed:,.0f} tokens/s = "
              f"{speed / base_speed:.2f}x ZeRO-0's (3 steps: rough)")


def paired(plain, ours, repeats: int) -> tuple[float, float, list[float]]:
    """Alternate plain() and ours() repeats times: (median plain, median ours, each pair's ratio)."""
    plains, ourss = [], []
    for _ in range(repeats):
        plains.append(plain())
        ourss.append(ours())
    return float(np.median(plains)), float(np.median(ourss)), [o / p for p, o in zip(plains, ourss)]


def overhead_rows(spec: GPTSpec, flops: int, batch: int, peak: dict, data: Path, workdir: Path, cores: int,
                  args) -> None:
    """Section 2: llm-ray against plain loops of the same model, one worker, then two."""
    import _plain_ddp  # benchmarks/ is on sys.path when this file runs (and in spawned children)

    steps = args.steps
    print(f"\noverhead: demo model ({GPT(spec).num_params() / 1e6:.1f}M parameters, {flops / 1e6:.0f} MFLOP/token), "
          f"micro-batch {batch} x {spec.context_length}, {steps} steps, {args.repeats} alternating pairs")
    variants = [("fp32, ZeRO-0", False, False, 0), ("fp32, ZeRO-2", False, False, 2),
                ("bf16 autocast", True, False, 0)]
    if not args.skip_compile:
        variants.append(("fp32 + compile", False, True, 0))
    for label, autocast, compile, stage in variants:
        def ours():
            return steady_tokens_per_sec(llm_ray_run(one_worker(
                "bench-" + slug(label), steps, cores, "train.total_batch_tokens=2048", f"train.zero_stage={stage}",
                f"train.autocast_bf16={str(autocast).lower()}", f"train.compile={str(compile).lower()}"),
                data, workdir).history)

        plain, mine, ratios = paired(lambda: plain_loop_tokens_per_sec(spec, batch, steps, autocast, compile), ours,
                                     args.repeats)
        p = peak["bf16" if autocast else "fp32"]
        print(f"  1 worker, {label:<15} plain {plain:8,.0f} tok/s | llm-ray {mine:8,.0f} tok/s | ratio "
              f"{np.median(ratios):.2f} (pairs {min(ratios):.2f}-{max(ratios):.2f}) | MFU plain "
              f"{flops * plain / (p * 1e12):.1%}, llm-ray {flops * mine / (p * 1e12):.1%}")

    world, threads = 2, max(1, cores // 2)
    store = iter(range(10**6))

    def plain_ddp():
        return _plain_ddp.tokens_per_sec(spec, batch, steps, world, threads, str(workdir / f"store-{next(store)}"))

    def ours_two():
        return steady_tokens_per_sec(llm_ray_run([
            "name=bench-2-workers", f"train.num_workers={world}", f"train.cpus_per_worker={cores / world:g}",
            f"train.torch_threads={threads}", f"train.total_batch_tokens={world * batch * spec.context_length}",
            "train.zero_stage=2", f"train.max_steps={steps}", "train.log_every=5", f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}", "train.eval_batches=1"], data, workdir).history)

    plain, mine, ratios = paired(plain_ddp, ours_two, args.repeats)
    print(f"  {world} workers, ZeRO-2 vs DDP   plain {plain:8,.0f} tok/s | llm-ray {mine:8,.0f} tok/s | ratio "
          f"{np.median(ratios):.2f} (pairs {min(ratios):.2f}-{max(ratios):.2f}), {threads} thread(s) per process")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating plain/llm-ray pairs per overhead row")
    parser.add_argument("--overhead-only", action="store_true", help="only the overhead rows (section 2)")
    parser.add_argument("--skip-compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--memory-only", action="store_true", help="only the memory rows (section 4)")
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
    if args.memory_only:
        memory_rows(data, workdir)
        return
    overhead_rows(spec, flops, batch, peak, data, workdir, cores, args)
    if args.overhead_only:
        return

    baby = GPTSpec(vocab_size=65, context_length=64, n_layer=4, n_head=4, n_embd=128)
    baby_data = synthetic_data(workdir / "baby-data", 65, 64, blocks=4096)
    print("\nnanoGPT baby GPT shape (4 layers, 4 heads, 128 wide, block 64, batch 12, vocab 65), against "
          f"nanoGPT's {NANOGPT_BABY_TOKENS_PER_SEC:,} tok/s\n(llm-ray itself runs vocab 260, the smallest byte-level BPE "
          "vocabulary it accepts):")
    baby_model = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.context_length=64",
                  "tokenizer.vocab_size=260", "data.block_size=64", "train.micro_batch_size=12",
                  "train.total_batch_tokens=768", "train.zero_stage=0"]
    baby_variants = [("fp32", False, False), ("bf16 autocast", True, False)]
    if not args.skip_compile:
        baby_variants.append(("fp32 + compile", False, True))
    for label, autocast, compile in baby_variants:
        plain = plain_loop_tokens_per_sec(baby, 12, args.steps * 5, autocast, compile)
        history = llm_ray_run(one_worker(
            "baby-" + slug(label), args.steps * 5, cores, *baby_model,
            f"train.autocast_bf16={str(autocast).lower()}", f"train.compile={str(compile).lower()}"),
            baby_data, workdir).history
        ours = steady_tokens_per_sec(history)
        print(f"  {label:<15} plain loop {plain:8,.0f} tok/s = {plain / NANOGPT_BABY_TOKENS_PER_SEC:.2f}x | "
              f"llm-ray {ours:8,.0f} tok/s = {ours / NANOGPT_BABY_TOKENS_PER_SEC:.2f}x")
    memory_rows(data, workdir)


if __name__ == "__main__":
    main()
