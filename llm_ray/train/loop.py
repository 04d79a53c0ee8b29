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


def bf16_autocast(setting: bool | str, device) -> bool:
    """train.autocast_bf16 on this worker: True/False as set; "auto" where bf16 matmuls are fast
    here (a CPU with AMX tiles, several times fp32's speed; a CUDA GPU with bf16), and with precision fp32."""
    if setting != "auto":
        return bool(setting)
    device_type = getattr(device, "type", str(device))
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and torch.cpu._is_amx_tile_supported()


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
    """Discards a step with a non-finite loss, or one spiking above spike_factor x the running mean of accepted steps.

    The verdict is taken on the device, with no host read per micro-batch: a rejected micro-batch's
    objective is multiplied by NaN, so its gradients, and after the all-reduce every worker's
    gradients, are NaN; DeepSpeed's optimizers then discard the whole step on every worker (its
    gradient-norm check, which it reads once per step anyway: ZeRO-1/2/3 and its bf16 optimizer),
    or ``discard_nonfinite_step`` does (ZeRO-0 in fp32 or fp16 passes the plain torch optimizer).
    The host learns of it from ``engine.was_step_applied()`` after the step.
    """

    def __init__(self, spike_factor: float, max_skipped: int, device, warmup: int = 20, decay: float = 0.98):
        self.spike_factor, self.max_skipped, self.warmup, self.decay = spike_factor, max_skipped, warmup, decay
        self.mean = torch.zeros((), device=device)  # of accepted steps' mean losses; valid once accepted > 0
        self.accepted = 0
        self.skipped = 0

    def rejected(self, loss: torch.Tensor) -> torch.Tensor:
        """A device-side bool: this micro-batch's loss is non-finite, or a spike once the mean has warmed up."""
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss)
        if self.spike_factor > 0 and self.accepted >= self.warmup:
            bad |= loss > self.spike_factor * self.mean
        return bad

    def record(self, applied: bool, step_loss: torch.Tensor, micro_batches: int, ours: bool) -> None:
        """After a step: an applied step's mean loss joins the running mean (on the device); a step
        discarded for a loss this guard rejected (ours) counts its micro-batches against max_skipped.
        A step that fp16's loss scaler discarded for overflowing gradients is not counted."""
        if applied:
            if self.accepted == 0:
                self.mean.copy_(step_loss)
            else:
                self.mean.lerp_(step_loss.to(self.mean.dtype), 1 - self.decay)
            self.accepted += 1
            return
        if not ours:
            return
        self.skipped += micro_batches
        if self.skipped > self.max_skipped:
            raise RuntimeError(
                f"{self.skipped} micro-batches skipped for non-finite or spiking loss, more than "
                f"train.max_skipped_batches ({self.max_skipped}); lower train.lr or check the data")


def poisoned(objective: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """objective, or NaN times it when rejected: NaN gradients mark the step for discarding."""
    return objective * torch.where(rejected, torch.full_like(objective, math.nan), torch.ones_like(objective))


def plain_torch_optimizer(engine) -> bool:
    """Whether DeepSpeed steps our torch optimizer itself (ZeRO-0 without bf16): no overflow check of its own."""
    return engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()


def discard_nonfinite_step(engine) -> None:
    """At the accumulation boundary under a plain torch optimizer, make engine.step() discard a step
    whose (all-reduced) gradients are non-finite, as DeepSpeed's own optimizers do: no update, no LR
    step, ``was_step_applied()`` False. One host read per optimizer step."""
    optimizer = engine.optimizer
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True
    if "_step_before_discard" in optimizer.__dict__:  # the previous step was discarded: restore its step
        optimizer.step = optimizer.__dict__.pop("_step_before_discard")
    optimizer.overflow = not finite
    if not finite:
        # DeepSpeed's _take_model_step calls optimizer.step(), then zero_grad(), then reads
        # optimizer.overflow to skip the LR schedule and report the step as not applied. The step
        # replaced here is the LR scheduler's wrapper of the optimizer's: kept, and put back above.
        optimizer._step_before_discard = optimizer.step
        optimizer.step = lambda *args, **kwargs: None


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
               device, l1_params: list, log, rank: int, loss_hook=None, autocast: bool = False
               ) -> tuple[torch.Tensor, float]:
    """One optimizer step of accum micro-batches, drawing new ones for as long as the guard discards
    the step. Returns (mean loss on device, LR used). No host read per micro-batch (see LossGuard)."""
    t = cfg.train
    accum = cfg.accum_steps(state.world_size or cfg.train.max_workers)
    device_type = getattr(device, "type", str(device))
    lr_used = engine.get_lr()[0]  # the scheduler steps after the optimizer: read it before
    while True:
        loss_sum = torch.zeros((), device=device)
        rejected = torch.zeros((), dtype=torch.bool, device=device)
        for _ in range(accum):
            block = torch.as_tensor(next(train_batches))  # numpy, or a tensor the batches' reader made
            state.samples = train_batches.position
            state.epoch = train_batches.order.epoch_at(state.samples)  # epochs completed
            # bf16 autocast: matmuls in bf16, weights and the optimizer in fp32.
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                _, loss = engine(*split_block(block, device))
            if loss_hook is not None:  # a testing seam (e.g. a NaN on one worker)
                loss = loss_hook(state, loss)
            bad = guard.rejected(loss)
            rejected |= bad
            objective = loss + t.l1 * l1_penalty(l1_params) if t.l1 else loss
            engine.backward(poisoned(objective, bad))  # DeepSpeed divides by the accumulation steps
            if engine.is_gradient_accumulation_boundary() and plain_torch_optimizer(engine):
                discard_nonfinite_step(engine)
            engine.step()  # optimizer and LR schedule step only on the accumulation boundary
            loss_sum += loss.detach().float() / accum
        applied = engine.was_step_applied()
        # Only when a step was discarded (on every worker alike): did the guard reject a loss on any worker?
        ours = not applied and reduce_over_workers(rejected.float(), "max") > 0
        guard.record(applied, loss_sum, accum, ours)
        if applied:
            return loss_sum, lr_used
        if ours:
            state.skipped_batches += accum
            if rank == 0:
                log(f"step {state.step + 1:>6} | skipped {accum} micro-batch(es): a loss was non-finite or spiking "
                    f"on some worker (this worker's mean {float(loss_sum):.4f})")


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
        workers = state.world_size or t.max_workers
        row["mfu"] = flops_per_token * tokens_per_sec / (t.peak_tflops_per_worker * 1e12 * workers)
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
    startup_marks: dict[str, float] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> TrainState:
    """Train until cfg.train.max_steps optimizer steps; evaluate, log and checkpoint on the way.

    train_batches yields blocks (micro_batch, block_size + 1); its position after each
    micro-batch, whether trained on or skipped, is the state's data position.
    save(state, metrics) writes a checkpoint and reports it (the worker's also moves state.history to
    the run's history folder); report(metrics) only reports.
    tracker (rank 0) receives loss, the LR each step used, gradient norm, throughput (training
    time only), MFU, memory, and the seconds spent evaluating and checkpointing.
    started: when the command started (time.time()); the state records the seconds from then to this
    run's first optimizer step as startup_seconds; startup_marks (milestone -> time.time()) are recorded
    with "untrained_eval" and "first_step" as startup_phases, in seconds after it.
    stop_requested() is asked after every step (on every worker alike, see train.stop): when it is True
    the run logs and checkpoints that step, skipping the evaluation, records it in state.stopped_at and
    returns before max_steps.
    """
    t = cfg.train
    device_type = getattr(device, "type", str(device))
    loss_sum = torch.zeros((), device=device)  # summed on device; read only when logging (a sync point)
    steps_since_log, times = 0, StepTimes()
    run_start, start_step = clock(), state.step
    guard = LossGuard(t.spike_factor, t.max_skipped_batches, device)
    guard.skipped = state.skipped_batches  # the budget spans restarts
    l1_params = l1_matrices(engine.module) if t.l1 else []
    autocast = bf16_autocast(t.autocast_bf16, device) and t.precision == "fp32"
    if rank == 0 and t.autocast_bf16 == "auto":
        log(f"train.autocast_bf16 auto: {'on' if autocast else 'off'} ({device_type}"
            f"{', AMX' if autocast and device_type == 'cpu' else ''})")

    def validate() -> float:
        began = clock()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = evaluate(engine, val_batches, device)
        times.eval += clock() - began
        return loss

    marks = dict(startup_marks or {})
    if state.step == 0:  # the untrained model's loss: the reference every later evaluation improves on
        record_validation({"step": 0, "epoch": 0, "tokens": 0}, validate(), state, rank, log, None, " (untrained)")
        marks["untrained_eval"] = time.time()

    while state.step < t.max_steps:
        began = clock()
        step_loss, lr_used = train_step(cfg, engine, train_batches, state, guard, device, l1_params, log, rank,
                                        loss_hook, autocast)
        loss_sum += step_loss
        times.train += clock() - began
        state.step += 1
        if started is not None and state.step == start_step + 1:
            marks["first_step"] = time.time()  # wall clock, whatever `clock` measures
            state.startup_seconds = marks["first_step"] - started
            state.startup_phases = {name: round(at - started, 2) for name, at in sorted(marks.items(), key=lambda m: m[1])}
            if rank == 0:
                phases = ", ".join(f"{name} {at:.1f}" for name, at in state.startup_phases.items())
                log(f"step {state.step:>6} | first step {state.startup_seconds:.1f} s after the command started ({phases})")
        state.tokens += t.total_batch_tokens
        steps_since_log += 1
        last = state.step == t.max_steps
        stopping = not last and stop_requested is not None and stop_requested()

        if state.step % t.log_every == 0 or last or stopping:
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

        is_eval = (state.step % t.eval_every == 0 or last) and not stopping  # the grace period is for the checkpoint
        is_ckpt = state.step % t.checkpoint_every == 0 or last or stopping
        if stopping:
            state.stopped_at.append(state.step)
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
        if stopping:
            if rank == 0:
                log(f"step {state.step:>6} | stopped on request: checkpoint written")
            break
    return state
