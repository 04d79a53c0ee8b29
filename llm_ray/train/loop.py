"""The training loop: an explicit step function and a plain `for`, with periodic side effects.

``train_loop_per_worker`` is the Ray Train boundary: it validates the config, builds the
DeepSpeed engine, picks up a checkpoint, opens the packed shards at the saved data position
(see ``train.data``), and calls ``run_training``, which knows nothing about Ray.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from llm_ray.checkpoint import MODEL_DIR, read_train_state, save_inference
from llm_ray.config import Config, model_spec
from llm_ray.model import GPT
from llm_ray.train.data import BlockOrder, MicroBatches, PackedBlocks, validation_batches

DS_DIR = "deepspeed"
DS_TAG = "state"


@dataclass
class TrainState:
    """What a resumed run needs besides model and optimizer (DeepSpeed saves those)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    tokens: int = 0  # training tokens consumed, all workers
    samples: int = 0  # position in the global block stream: blocks consumed by all workers (see train.data)
    world_size: int = 0  # workers of the run that wrote this state
    data_key: str | None = None  # the prepared data's pack-stage key: the stream positions refer to it
    history: list[dict] = field(default_factory=list)  # logged and evaluation metrics, one dict per event
    tracker_run_id: str | None = None  # the W&B run a resumed run continues
    resumed_from: list[int] = field(default_factory=list)  # checkpoint steps this run restarted from
    skipped_batches: int = 0  # micro-batches the loss guard rejected


def reduce_over_workers(value: torch.Tensor, op: str) -> float:
    """A scalar reduced over all workers: op 'mean' (gloo has no AVG, so SUM / world) or 'max'
    (NaN propagates, so any worker's NaN is seen by all)."""
    value = value.detach().float().reshape(1).clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            value /= dist.get_world_size()
    return float(value.item())


def split_block(block: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) packed tokens -> inputs (B, T) and next-token targets (B, T)."""
    block = block.to(device, dtype=torch.long, non_blocking=True)
    return block[:, :-1], block[:, 1:]


@torch.no_grad()
def evaluate(engine, val_batches: list[tuple[torch.Tensor, float]], device) -> float:
    """Mean loss per token over every worker's (micro-batch, weight) pairs: exact whatever the
    batching; weight-0 batches only keep the workers' forward passes in step."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (summed loss, tokens)
    for block, weight in val_batches:
        x, y = split_block(block, device)
        total[0] += engine(x, y)[1].double() * y.numel() * weight
        total[1] += y.numel() * weight
    engine.train()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total[0] / total[1])


class LossGuard:
    """Rejects non-finite losses and spikes above spike_factor x the running mean of accepted ones."""

    def __init__(self, spike_factor: float, max_skipped: int, warmup: int = 20, decay: float = 0.98):
        self.spike_factor, self.max_skipped, self.warmup, self.decay = spike_factor, max_skipped, warmup, decay
        self.mean: float | None = None
        self.accepted = 0
        self.skipped = 0

    def accept(self, loss: float) -> bool:
        spike = (self.spike_factor > 0 and self.mean is not None and self.accepted >= self.warmup
                 and loss > self.spike_factor * self.mean)
        if not math.isfinite(loss) or spike:
            self.skipped += 1
            if self.skipped > self.max_skipped:
                raise RuntimeError(
                    f"{self.skipped} micro-batches skipped for non-finite or spiking loss (last: {loss}), more "
                    f"than train.max_skipped_batches ({self.max_skipped}); lower train.lr or check the data")
            return False
        self.accepted += 1
        self.mean = loss if self.mean is None else self.decay * self.mean + (1 - self.decay) * loss
        return True


def l1_penalty(engine) -> torch.Tensor:
    """Sum of |w| over the decayed matrices (the first param group)."""
    return sum(p.abs().sum() for p in engine.optimizer.param_groups[0]["params"])


def memory_bytes(device) -> int:
    """Peak memory of this worker: allocated device memory on GPU, resident set size on CPU."""
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_training(
    cfg: Config,
    engine,
    train_batches: MicroBatches,
    val_batches: list[tuple[torch.Tensor, float]],
    state: TrainState,
    save: Callable[[TrainState, dict], None],
    report: Callable[[dict], None],
    rank: int,
    device,
    log: Callable[[str], None] = print,
    tracker=None,
    flops_per_token: int = 0,
) -> TrainState:
    """Train until cfg.train.max_steps optimizer steps; evaluate, log and checkpoint on the way.

    train_batches yields blocks (micro_batch, block_size + 1); its position after each
    micro-batch, whether trained on or skipped, is the state's data position.
    save(state, metrics) writes a checkpoint and reports it; report(metrics) only reports.
    tracker (rank 0) receives loss, LR, gradient norm, throughput, MFU and memory.
    """
    t = cfg.train
    accum = cfg.grad_accum_steps
    tokens_per_step = t.total_batch_tokens
    device_type = getattr(device, "type", str(device))
    loss_sum = torch.zeros((), device=device)  # summed on device; read only when logging (a sync point)
    steps_since_log, window_start = 0, time.time()
    run_start, start_step = time.time(), state.step
    guard = LossGuard(t.spike_factor, t.max_skipped_batches)
    guard.skipped = state.skipped_batches  # the budget spans restarts

    if state.step == 0:  # the untrained model's loss: the reference every later evaluation improves on
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=t.autocast_bf16):
            val_loss = evaluate(engine, val_batches, device)
        state.history.append({"step": 0, "epoch": 0, "tokens": 0, "val_loss": val_loss,
                              "val_perplexity": math.exp(val_loss)})
        if rank == 0:
            log(f"step {0:>6} | val loss {val_loss:.4f} (untrained)")

    while state.step < t.max_steps:
        done = 0
        while done < accum:
            block = next(train_batches)
            state.samples = train_batches.position
            state.epoch = train_batches.order.epoch_at(state.samples)  # epochs completed
            block = torch.from_numpy(block)
            # bf16 autocast: matmuls in bf16, weights and the optimizer in fp32.
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=t.autocast_bf16):
                _, loss = engine(*split_block(block, device))
            # Every worker takes the same decision, from the worst loss of all (one small collective).
            if not guard.accept(reduce_over_workers(loss, "max")):
                state.skipped_batches += 1
                if rank == 0:
                    log(f"step {state.step + 1:>6} | skipped a micro-batch: loss {loss.item():.4f}")
                continue
            done += 1
            objective = loss + t.l1 * l1_penalty(engine) if t.l1 else loss
            engine.backward(objective)  # DeepSpeed divides by the accumulation steps
            engine.step()  # optimizer and LR schedule step only on the accumulation boundary
            loss_sum += loss.detach() / accum
        state.step += 1
        state.tokens += tokens_per_step
        steps_since_log += 1
        last = state.step == t.max_steps

        if state.step % t.log_every == 0 or last:
            train_loss = reduce_over_workers(loss_sum / steps_since_log, "mean")
            elapsed = time.time() - window_start
            tokens_per_sec = steps_since_log * tokens_per_step / elapsed
            eta = (time.time() - run_start) / (state.step - start_step) * (t.max_steps - state.step)
            grad_norm = engine.get_global_grad_norm()
            row = {"step": state.step, "train_loss": train_loss, "lr": engine.get_lr()[0],
                   "tokens_per_sec": tokens_per_sec, "memory_gb": memory_bytes(device) / 1e9}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            mfu = ""
            if t.peak_tflops_per_worker and flops_per_token:
                row["mfu"] = flops_per_token * tokens_per_sec / (t.peak_tflops_per_worker * 1e12 * t.num_workers)
                mfu = f" | mfu {row['mfu']:.1%}"
            state.history.append(row)
            if rank == 0:
                log(f"step {state.step:>6}/{t.max_steps} | loss {train_loss:.4f} | lr {row['lr']:.2e} | "
                    f"{tokens_per_sec:,.0f} tok/s{mfu} | eta {eta:,.0f}s")
                if tracker is not None:
                    tracker.log({k: v for k, v in row.items() if k != "step"}, step=state.step)
            loss_sum.zero_()
            steps_since_log, window_start = 0, time.time()

        is_eval = state.step % t.eval_every == 0 or last
        is_ckpt = state.step % t.checkpoint_every == 0 or last
        if is_eval or is_ckpt:
            metrics = {"step": state.step, "epoch": state.epoch, "tokens": state.tokens}
            if is_eval:
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=t.autocast_bf16):
                    metrics["val_loss"] = evaluate(engine, val_batches, device)
                metrics["val_perplexity"] = math.exp(metrics["val_loss"])
                state.history.append(metrics)
                if rank == 0:
                    log(f"step {state.step:>6} | val loss {metrics['val_loss']:.4f} | "
                        f"val ppl {metrics['val_perplexity']:.1f}")
                    if tracker is not None:
                        tracker.log({"val_loss": metrics["val_loss"], "val_perplexity": metrics["val_perplexity"]},
                                    step=state.step)
            if is_ckpt:
                save(state, metrics)
            else:
                report(metrics)
    return state


def consolidated_state_dict(engine, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """Full model weights on rank 0 (None elsewhere). Under ZeRO-3 every rank must call this."""
    module = engine.module
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with gather:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None


def worker_log(line: str) -> None:
    """One progress line on the worker's stdout, which Ray forwards to the driver.

    Not print(): Ray Train redirects print to its logger, which shows each line twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def read_saved_config(checkpoint_dir: str) -> dict:
    """The resolved config a checkpoint was written with, as a plain dict."""
    import yaml

    return yaml.safe_load((Path(checkpoint_dir) / MODEL_DIR / "config.yaml").read_text(encoding="utf-8"))


def check_resumable(saved: TrainState, saved_config: dict, cfg: Config, data_key: str | None, world: int) -> None:
    """Refuse, with the field to change, a resume that would fail deep in DeepSpeed or silently
    train on the wrong thing."""
    stage = saved_config.get("train", {}).get("zero_stage", cfg.train.zero_stage)
    if stage != cfg.train.zero_stage:
        raise ValueError(f"the checkpoint at step {saved.step} was written at ZeRO-{stage}: resume with "
                         f"train.zero_stage={stage}, or start a new run (--set name=...)")
    if stage == 3 and saved.world_size not in (0, world):
        # DeepSpeed's universal conversion loads, but the re-partitioned ZeRO-3 optimizer state
        # did not reproduce the uninterrupted run in our test (ZeRO-2's does, to 6 decimals).
        raise ValueError(f"the ZeRO-3 checkpoint at step {saved.step} was written by {saved.world_size} workers: "
                         f"resume it with train.num_workers={saved.world_size} (not {world})")
    if saved.data_key is not None and saved.data_key != data_key:
        raise ValueError(f"the checkpoint at step {saved.step} was trained on other prepared data (it was "
                         "prepared again since): its data position means nothing here. Start a new run "
                         "(--set name=...) or train on the data it was trained on (--data)")


@contextlib.contextmanager
def universal_checkpoint(ds_dir: str, ctx):
    """DeepSpeed's universal form of the checkpoint, converted once per node (by its local rank 0)
    into a folder that the node's workers share, and removed after everyone loaded it."""
    import shutil

    from llm_ray.train.engine import to_universal

    node_dir = os.path.join(tempfile.gettempdir(), f"llm-ray-universal-{ctx.get_experiment_name()}")
    if ctx.get_local_rank() == 0:
        shutil.rmtree(node_dir, ignore_errors=True)
        to_universal(ds_dir, DS_TAG, node_dir)
    dist.barrier()
    try:
        yield node_dir
    finally:
        dist.barrier()  # every worker has loaded it
        if ctx.get_local_rank() == 0:
            shutil.rmtree(node_dir, ignore_errors=True)


def train_loop_per_worker(payload: dict) -> None:
    """Entry point of each Ray Train worker."""
    import ray.train
    import ray.train.torch

    # DeepSpeed 0.19 calls a torch collective that torch 2.13 deprecated, at every step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    cfg = Config.model_validate(payload["config"])
    tokenizer_json: str = payload["tokenizer_json"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()

    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    from llm_ray.train.engine import UNIVERSAL_INFO, build_engine

    model = GPT(model_spec(cfg))
    model.activation_checkpointing = cfg.train.activation_checkpointing
    model_flops = model.flops_per_token(cfg.data.block_size)  # before ZeRO-3 partitions the parameters

    world = ctx.get_world_size()
    state = TrainState(world_size=world, data_key=payload["data_key"])
    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        engine = None
        if checkpoint is not None:
            d = stack.enter_context(checkpoint.as_directory())
            ds_dir = os.path.join(d, DS_DIR)
            saved = TrainState(**read_train_state(d))
            check_resumable(saved, read_saved_config(d), cfg, payload["data_key"], world)
            # ZeRO shards the optimizer state over the workers: under another worker count it is
            # re-partitioned through DeepSpeed's universal checkpoint format.
            regroup = cfg.train.zero_stage > 0 and saved.world_size not in (0, world)
            if regroup:
                ds_dir = stack.enter_context(universal_checkpoint(ds_dir, ctx))
                if rank == 0:
                    worker_log(f"re-partitioned the optimizer state of {saved.world_size} workers for {world}")
            engine = build_engine(model, cfg, load_universal=regroup)
            _, client_state = engine.load_checkpoint(ds_dir, tag=DS_TAG)
            state = TrainState(**client_state["train_state"])
            state.resumed_from.append(state.step)
            state.world_size, state.data_key = world, payload["data_key"]
            if state.step and not state.samples:  # written before the data position was recorded
                state.samples = state.step * cfg.train.total_batch_tokens // cfg.data.block_size
            if rank == 0:
                worker_log(f"resumed from step {state.step}, block {state.samples} of the data stream "
                           f"({checkpoint.path})")
    if engine is None:
        engine = build_engine(model, cfg)
    if cfg.train.compile:
        engine.compile()  # compiles the module in place: parameter names and checkpoints are unchanged

    micro = cfg.train.micro_batch_size
    val_batches = [(torch.from_numpy(b), w) for b, w in validation_batches(
        PackedBlocks(payload["val_shards"]), cfg.train.eval_batches * micro, cfg.seed, rank, world, micro)]
    blocks = PackedBlocks(payload["train_shards"])
    train_batches = MicroBatches(blocks, BlockOrder(len(blocks), cfg.seed, cfg.train.shuffle), state.samples, rank,
                                 world, cfg.train.micro_batch_size)

    def save(state: TrainState, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag=DS_TAG,
                                   client_state={"train_state": asdict(state), **UNIVERSAL_INFO})
            weights = consolidated_state_dict(engine, cfg.train.zero_stage, rank)
            if rank == 0:
                save_inference(tmp, weights, cfg, tokenizer_json, asdict(state))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    from llm_ray.tracking import make_tracker

    tracker = make_tracker(cfg, rank, Path(payload["run_dir"]) / "wandb", state.tracker_run_id)
    state.tracker_run_id = tracker.run_id
    try:
        run_training(cfg, engine, train_batches, val_batches, state, save, ray.train.report, rank, device,
                     worker_log, tracker, model_flops)
    finally:
        tracker.finish()
