"""The training loop: an explicit step function and a plain `for`, with periodic side effects.

``run_training`` knows nothing about Ray: ``train.worker`` is the Ray Train boundary that
builds the engine and the data and calls it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from llm_ray.checkpoint.state import TrainState
from llm_ray.config import Config
from llm_ray.memory import peak_memory_bytes
from llm_ray.train.data import MicroBatches
from llm_ray.train.engine import param_groups


def reduce_over_workers(value: torch.Tensor, op: str) -> float:
    """A scalar reduced over all workers: op 'mean' (gloo has no AVG, so SUM / world) or 'max'."""
    value = value.detach().float().reshape(1).clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            value /= dist.get_world_size()
    return float(value.item())


def worst_loss_over_workers(loss: torch.Tensor) -> float:
    """The largest loss of all workers, +inf when any worker's loss is NaN or infinite.

    NaN is mapped to +inf before the MAX: gloo's max is std::max, which keeps or drops a NaN
    depending on the order of its arguments, so NaN itself would not reach every worker and
    the workers could take different decisions (one skipping backward while the others
    all-reduce gradients: a hang until the collective timeout).
    """
    value = loss.detach().float().reshape(1)
    value = torch.where(torch.isfinite(value), value, torch.full_like(value, math.inf))
    return reduce_over_workers(value, "max")


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


def l1_matrices(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The module's own decayed matrices (see engine.param_groups), whatever the ZeRO stage.

    Not the optimizer's param groups: under ZeRO-1/2 and DeepSpeed's bf16 optimizer those
    hold flat fp32 partitions detached from the model, and a penalty on them never reaches
    the gradients.
    """
    return param_groups(module, 0.0)[0]["params"]


def l1_penalty(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Sum of |w| over the matrices, accumulated in fp32 (also for bf16 weights)."""
    return sum(p.abs().sum(dtype=torch.float32) for p in matrices)


@dataclass
class StepTimes:
    """Seconds spent training, evaluating and checkpointing: throughput counts only the first."""

    train: float = 0.0
    eval: float = 0.0
    checkpoint: float = 0.0


def train_step(cfg: Config, engine, train_batches: MicroBatches, state: TrainState, guard: LossGuard,
               device, l1_params: list, log, rank: int, loss_hook=None) -> tuple[torch.Tensor, float]:
    """One optimizer step: accum accepted micro-batches. Returns (mean loss on device, LR used)."""
    t = cfg.train
    accum = cfg.grad_accum_steps
    device_type = getattr(device, "type", str(device))
    lr_used = engine.get_lr()[0]  # the scheduler steps after the optimizer: read it before
    loss_sum = torch.zeros((), device=device)
    done = 0
    while done < accum:
        block = torch.as_tensor(next(train_batches))  # numpy, or a tensor the batches' reader made
        state.samples = train_batches.position
        state.epoch = train_batches.order.epoch_at(state.samples)  # epochs completed
        # bf16 autocast: matmuls in bf16, weights and the optimizer in fp32.
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=t.autocast_bf16):
            _, loss = engine(*split_block(block, device))
        if loss_hook is not None:  # a testing seam (e.g. a NaN on one worker)
            loss = loss_hook(state, loss)
        # Every worker decides from the worst loss of all: one all-reduce of one number per
        # micro-batch. Its host read waits for the forward pass, then backward is launched at
        # once: a gap of a kernel launch, which a GPU step of many milliseconds does not notice.
        if not guard.accept(worst_loss_over_workers(loss)):
            state.skipped_batches += 1
            if rank == 0:
                log(f"step {state.step + 1:>6} | skipped a micro-batch: loss {loss.item():.4f} here, "
                    "non-finite or spiking on some worker")
            continue
        done += 1
        objective = loss + t.l1 * l1_penalty(l1_params) if t.l1 else loss
        engine.backward(objective)  # DeepSpeed divides by the accumulation steps
        engine.step()  # optimizer and LR schedule step only on the accumulation boundary
        loss_sum += loss.detach() / accum
    return loss_sum, lr_used


def log_row(cfg: Config, engine, state: TrainState, train_loss: float, lr: float, steps: int, times: StepTimes,
            device, flops_per_token: int) -> dict:
    """The progress row of the last `steps` steps: throughput and MFU over training time only."""
    t = cfg.train
    tokens_per_sec = steps * t.total_batch_tokens / max(times.train, 1e-9)
    row = {"step": state.step, "train_loss": train_loss, "lr": lr, "tokens_per_sec": tokens_per_sec,
           "memory_gb": peak_memory_bytes(device) / 1e9, "train_seconds": times.train, "eval_seconds": times.eval,
           "checkpoint_seconds": times.checkpoint}
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    if t.peak_tflops_per_worker and flops_per_token:
        row["mfu"] = flops_per_token * tokens_per_sec / (t.peak_tflops_per_worker * 1e12 * t.num_workers)
    return row


def progress_line(row: dict, max_steps: int, eta: float) -> str:
    mfu = f" | mfu {row['mfu']:.1%}" if "mfu" in row else ""
    return (f"step {row['step']:>6}/{max_steps} | loss {row['train_loss']:.4f} | lr {row['lr']:.2e} | "
            f"{row['tokens_per_sec']:,.0f} tok/s{mfu} | eta {eta:,.0f}s")


def record_validation(metrics: dict, val_loss: float, state: TrainState, rank: int, log, tracker,
                      note: str = "") -> None:
    """Add the validation loss and perplexity to metrics and the history; print and track them on rank 0."""
    metrics.update(val_loss=val_loss, val_perplexity=math.exp(val_loss))
    state.history.append(metrics)
    if rank == 0:
        log(f"step {metrics['step']:>6} | val loss {val_loss:.4f} | val ppl {metrics['val_perplexity']:.1f}{note}")
        if tracker is not None:
            tracker.log({"val_loss": val_loss, "val_perplexity": metrics["val_perplexity"]}, step=metrics["step"])


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
    clock: Callable[[], float] = time.perf_counter,
    loss_hook=None,
    started: float | None = None,
) -> TrainState:
    """Train until cfg.train.max_steps optimizer steps; evaluate, log and checkpoint on the way.

    train_batches yields blocks (micro_batch, block_size + 1); its position after each
    micro-batch, whether trained on or skipped, is the state's data position.
    save(state, metrics) writes a checkpoint and reports it (the worker's also moves state.history to
    the run's history folder); report(metrics) only reports.
    tracker (rank 0) receives loss, the LR each step used, gradient norm, throughput (training
    time only), MFU, memory, and the seconds spent evaluating and checkpointing.
    started: when the command started (time.time()); the state records the seconds from then to this
    run's first optimizer step as startup_seconds.
    """
    t = cfg.train
    device_type = getattr(device, "type", str(device))
    loss_sum = torch.zeros((), device=device)  # summed on device; read only when logging (a sync point)
    steps_since_log, times = 0, StepTimes()
    run_start, start_step = clock(), state.step
    guard = LossGuard(t.spike_factor, t.max_skipped_batches)
    guard.skipped = state.skipped_batches  # the budget spans restarts
    l1_params = l1_matrices(engine.module) if t.l1 else []

    def validate() -> float:
        began = clock()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=t.autocast_bf16):
            loss = evaluate(engine, val_batches, device)
        times.eval += clock() - began
        return loss

    if state.step == 0:  # the untrained model's loss: the reference every later evaluation improves on
        record_validation({"step": 0, "epoch": 0, "tokens": 0}, validate(), state, rank, log, None, " (untrained)")

    while state.step < t.max_steps:
        began = clock()
        step_loss, lr_used = train_step(cfg, engine, train_batches, state, guard, device, l1_params, log, rank,
                                        loss_hook)
        loss_sum += step_loss
        times.train += clock() - began
        state.step += 1
        if started is not None and state.step == start_step + 1:
            state.startup_seconds = time.time() - started  # wall clock, whatever `clock` measures
            if rank == 0:
                log(f"step {state.step:>6} | first step {state.startup_seconds:.1f} s after the command started")
        state.tokens += t.total_batch_tokens
        steps_since_log += 1
        last = state.step == t.max_steps

        if state.step % t.log_every == 0 or last:
            train_loss = reduce_over_workers(loss_sum / steps_since_log, "mean")
            row = log_row(cfg, engine, state, train_loss, lr_used, steps_since_log, times, device, flops_per_token)
            state.history.append(row)
            if rank == 0:
                eta = (clock() - run_start) / (state.step - start_step) * (t.max_steps - state.step)
                log(progress_line(row, t.max_steps, eta))
                if tracker is not None:
                    tracker.log({k: v for k, v in row.items() if k != "step"}, step=state.step)
            loss_sum.zero_()
            steps_since_log, times = 0, StepTimes()

        is_eval = state.step % t.eval_every == 0 or last
        is_ckpt = state.step % t.checkpoint_every == 0 or last
        if is_eval or is_ckpt:
            metrics = {"step": state.step, "epoch": state.epoch, "tokens": state.tokens}
            if is_eval:
                record_validation(metrics, validate(), state, rank, log, tracker)
            if is_ckpt:
                began = clock()
                save(state, metrics)
                times.checkpoint += clock() - began
            else:
                report(metrics)
    return state
