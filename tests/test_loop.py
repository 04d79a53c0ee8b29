"""The training loop on a real DeepSpeed engine in this process (a one-worker gloo group, no Ray):
L1 under every ZeRO stage and precision, the LR and throughput that the progress rows report."""

import math

import numpy as np
import pytest
import torch

from llm_ray.config import load_config, model_spec
from llm_ray.model import GPT
from llm_ray.train.data import BlockOrder, MicroBatches, PackedBlocks, validation_batches
from llm_ray.train.engine import build_engine
from llm_ray.checkpoint import TrainState
from llm_ray.train.loop import l1_matrices, l1_penalty, run_training
from llm_ray.train.schedule import lr_at

pytestmark = pytest.mark.slow




def one_worker(*overrides):
    return load_config("debug", ["train.num_workers=1", "train.total_batch_tokens=512", *overrides])


def run(cfg, tmp_path, clock=None, save=None, log=None, flops_per_token=0, started=None, loss_hook=None,
        startup_marks=None, stop_requested=None):
    """run_training on random tokens: (final state, engine)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        np.save(tmp_path / f"{split}.npy", rng.integers(0, cfg.vocab_size, (64, cfg.data.block_size + 1),
                                                        dtype=np.uint16))
    torch.manual_seed(cfg.seed)
    engine = build_engine(GPT(model_spec(cfg)), cfg)
    micro = cfg.train.micro_batch_size
    blocks = PackedBlocks([tmp_path / "train.npy"])
    batches = MicroBatches(blocks, BlockOrder(len(blocks), cfg.seed), 0, 0, 1, micro)
    val = [(torch.from_numpy(b), w) for b, w in
           validation_batches(PackedBlocks([tmp_path / "val.npy"]), 2 * micro, cfg.seed, 0, 1, micro)]
    kwargs = {"clock": clock} if clock else {}
    state = run_training(cfg, engine, batches, val, TrainState(world_size=1), save or (lambda s, m: None),
                         lambda m: None, 0, torch.device("cpu"), log=log or (lambda line: None),
                         flops_per_token=flops_per_token, started=started, loss_hook=loss_hook,
                         startup_marks=startup_marks, stop_requested=stop_requested,
                         **kwargs)
    return state, engine


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16"), (2, "bf16")])
def test_l1_shrinks_the_matrices_under_every_zero_stage_and_precision(process_group, tmp_path, stage, precision):
    """Under ZeRO-1/2 and DeepSpeed's bf16 optimizer, the optimizer's param groups are flat
    partitions detached from the model: a penalty on them changed nothing. It must here."""
    norms = {}
    for l1 in (0.0, 0.05):
        cfg = one_worker(f"train.zero_stage={stage}", f"train.precision={precision}", f"train.l1={l1}",
                         "train.max_steps=10", "train.weight_decay=0")
        _, engine = run(cfg, tmp_path, log=None)
        with torch.no_grad():
            norms[l1] = float(l1_penalty(l1_matrices(engine.module)))
    assert norms[0.05] < 0.5 * norms[0.0], norms


def test_startup_seconds_run_from_the_command_start_to_the_first_step(process_group, tmp_path):
    """A command that started 100 s before this test: its first optimizer step comes 100 s plus the time
    this test took to get there after it; without a start time nothing is recorded."""
    import time

    cfg = one_worker("train.max_steps=3")
    before = time.time()
    state, _ = run(cfg, tmp_path, started=before - 100.0, startup_marks={"engine": before - 50.0})
    after = time.time()
    assert 100.0 < state.startup_seconds <= 100.0 + (after - before)
    assert list(state.startup_phases) == ["engine", "untrained_eval", "first_step"]
    assert state.startup_phases["engine"] == pytest.approx(50.0, abs=0.01)
    assert state.startup_phases["first_step"] == pytest.approx(state.startup_seconds, abs=0.01)
    assert run(cfg, tmp_path)[0].startup_seconds is None


def test_a_stop_request_checkpoints_the_step_reached_and_ends_the_run(process_group, tmp_path):
    """Asked to stop after step 7 (of 40; checkpoints every 100, logs every 5): step 7 is logged and
    checkpointed, without an evaluation, and nothing more is trained. Never asked: the run goes to the end."""
    cfg = one_worker("train.max_steps=40", "train.checkpoint_every=100", "train.log_every=5", "train.eval_every=5")
    saved, asked = [], []

    def stop_requested():
        asked.append(len(asked) + 1)
        return len(asked) == 7

    state, _ = run(cfg, tmp_path, save=lambda s, m: saved.append((s.step, dict(m))), stop_requested=stop_requested)
    assert state.step == 7 and state.stopped_at == [7] and asked == list(range(1, 8))
    assert saved == [(7, {"step": 7, "epoch": state.epoch, "tokens": 7 * 512})]  # no val_loss
    assert [h["step"] for h in state.history if "train_loss" in h] == [5, 7]
    assert [h["step"] for h in state.history if "val_loss" in h] == [0, 5]
    full, _ = run(cfg, tmp_path, save=lambda s, m: None, stop_requested=lambda: False)
    assert full.step == 40 and full.stopped_at == []


def test_progress_rows_log_the_lr_each_step_used(process_group, tmp_path):
    cfg = one_worker("train.max_steps=8", "train.warmup_steps=4", "train.log_every=1", "train.zero_stage=2")
    state, _ = run(cfg, tmp_path)
    rows = [h for h in state.history if "train_loss" in h]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # Step s (1-based) is optimizer step s - 1 of the schedule: warmup gives lr/4, 2lr/4, ...
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s - 1, cfg.train) for s in range(1, 9)])
    assert rows[0]["lr"] == pytest.approx(cfg.train.lr / 4)


def test_throughput_counts_training_time_only(process_group, tmp_path):
    """A clock that advances one second per reading, and a checkpoint that takes 1000 s: the
    tokens/s of a row come from the training seconds alone; eval and checkpoint time are
    reported beside them."""
    now = {"t": 0.0}

    def clock():
        now["t"] += 1.0
        return now["t"]

    def slow_save(state, metrics):
        now["t"] += 1000.0

    cfg = one_worker("train.max_steps=6", "train.log_every=3", "train.checkpoint_every=3", "train.eval_every=3")
    state, _ = run(cfg, tmp_path, clock=clock, save=slow_save)
    rows = [h for h in state.history if "train_loss" in h]
    assert [r["step"] for r in rows] == [3, 6]
    for row in rows:  # each step: one reading before, one after, 1 s apart
        assert row["train_seconds"] == pytest.approx(3.0)
        assert row["tokens_per_sec"] == pytest.approx(3 * cfg.train.total_batch_tokens / 3.0)
    assert rows[1]["checkpoint_seconds"] >= 1000 and rows[1]["eval_seconds"] > 0
    assert "mfu" not in rows[0]  # no peak given


def test_mfu_is_reported_against_peak_tflops_per_worker(process_group, tmp_path):
    cfg = one_worker("train.max_steps=2", "train.log_every=1", "train.peak_tflops_per_worker=0.5")
    state, _ = run(cfg, tmp_path, flops_per_token=10**6)
    for row in (h for h in state.history if "train_loss" in h):
        assert row["mfu"] == pytest.approx(10**6 * row["tokens_per_sec"] / (0.5e12 * 1))




def bad_losses(indices, factor=math.nan):
    """A loss hook: the loss times factor at those micro-batches (counted from 0 over the run)."""
    seen = {"count": 0}

    def hook(state, loss):
        seen["count"] += 1
        return loss * factor if seen["count"] - 1 in indices else loss

    return hook


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (2, "bf16")])
def test_a_nan_discards_its_whole_step_under_every_zero_stage_and_precision(process_group, tmp_path, stage,
                                                                             precision):
    """Two micro-batches per step; the 4th (step 2's second) is NaN. Its step is discarded whole: no
    weight turns NaN, the LR schedule advances only with applied steps, and two more micro-batches
    are drawn to make up the step. DeepSpeed's optimizers discard it at ZeRO-1/2/3 and in bf16;
    at ZeRO-0 fp32, discard_nonfinite_step does (without it, every weight turns NaN there)."""
    cfg = one_worker(f"train.zero_stage={stage}", f"train.precision={precision}", "train.total_batch_tokens=1024",
                     "train.max_steps=4", "train.eval_every=100", "train.checkpoint_every=100")
    assert cfg.grad_accum_steps == 2
    state, engine = run(cfg, tmp_path, loss_hook=bad_losses({3}))
    assert state.step == 4 and state.skipped_batches == 2
    assert state.samples == (4 + 1) * 2 * cfg.train.micro_batch_size
    assert engine.lr_scheduler.last_epoch == 4 and engine.skipped_steps == 1
    with torch.no_grad():
        assert all(torch.isfinite(p).all() for p in engine.module.parameters())
    assert all(math.isfinite(h["train_loss"]) for h in state.history if "train_loss" in h)


def test_a_spike_after_the_warmup_is_discarded_and_too_many_stop_the_run(process_group, tmp_path):
    """A finite loss 100x the running mean: its gradients are finite, so only the guard's poisoned
    objective makes DeepSpeed discard the step (without it, the spike trains)."""
    cfg = one_worker("train.max_steps=25", "train.eval_every=100", "train.checkpoint_every=100")
    state, _ = run(cfg, tmp_path, loss_hook=bad_losses({22}, factor=100.0))
    assert state.step == 25 and state.skipped_batches == 1
    early, _ = run(cfg, tmp_path, loss_hook=bad_losses({5}, factor=100.0))  # before the guard's warmup
    assert early.skipped_batches == 0
    off, _ = run(one_worker("train.max_steps=25", "train.spike_factor=0"), tmp_path,
                 loss_hook=bad_losses({22}, factor=100.0))
    assert off.skipped_batches == 0  # spike_factor 0: spikes train
    stop = one_worker("train.max_steps=25", "train.max_skipped_batches=2")
    with pytest.raises(RuntimeError, match="train.max_skipped_batches"):
        run(stop, tmp_path, loss_hook=bad_losses({2, 3, 4}))


@pytest.mark.parametrize("stage, per_step", [(2, 0), (0, 1)])
def test_no_host_read_per_micro_batch(process_group, tmp_path, monkeypatch, stage, per_step):
    """Values the step code reads to the host (item, float, bool, int of a tensor), 4 micro-batches a step:
    none under ZeRO-2, one per step under ZeRO-0 fp32 (whether the gradients are finite)."""
    step_code = {"train_step", "rejected", "record", "poisoned", "discard_nonfinite_step", "split_block"}
    reads = []
    for name in ("item", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            import sys

            caller = sys._getframe(1).f_code
            if caller.co_name in step_code and caller.co_filename.endswith("loop.py"):
                reads.append((caller.co_name, _name))
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = one_worker(f"train.zero_stage={stage}", "train.total_batch_tokens=2048", "train.max_steps=3",
                     "train.log_every=100", "train.eval_every=100", "train.checkpoint_every=100")
    assert cfg.grad_accum_steps == 4
    state, _ = run(cfg, tmp_path)
    assert state.step == 3
    assert len(reads) == per_step * 3, reads
