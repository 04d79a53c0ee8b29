"""The run's history lives in the run folder, one file per checkpoint interval; a checkpoint records
only the step up to which that history is complete, so it does not grow with the run. A resumed run
carries the history on without gaps or duplicates, whatever a crashed run wrote past its last
complete checkpoint."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_ray.checkpoint import read_history, read_train_state, write_history
from llm_ray.storage import Location


def history_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------ the history files, no training


def test_the_history_follows_the_files_back_from_the_checkpoint_step(tmp_path):
    """Files off the chain (what crashed runs wrote past their last complete checkpoint: 10-15 and
    20-30) and an unrelated file are never read; the entries come in step order."""
    folder = Location(str(tmp_path / "history"))
    write_history(folder, 0, 10, [{"step": 0, "val_loss": 6.0}, {"step": 10, "train_loss": 5.0}])
    write_history(folder, 10, 15, [{"step": 15, "train_loss": 9.9}])  # a crashed run's
    write_history(folder, 10, 20, [{"step": 20, "train_loss": 4.0}])
    write_history(folder, 20, 30, [{"step": 30, "train_loss": 9.9}])  # the crashed run's
    write_history(folder, 20, 25, [{"step": 25, "train_loss": 3.5}])  # the resumed run's
    (tmp_path / "history" / "notes.txt").write_text("not a history file")
    state = {"step": 25, "history_dir": folder.uri, "history_through": 25, "history": []}
    assert [h["step"] for h in read_history(tmp_path, state)] == [0, 10, 20, 25]
    assert read_history(tmp_path, state, since_step=24) == [{"step": 25, "train_loss": 3.5}]

    (tmp_path / "history" / "0000000010-0000000020.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="no file ending at step 20"):
        read_history(tmp_path, state)


def test_a_model_folder_away_from_its_run_is_served_without_a_validation_loss(tmp_path):
    """Provenance reads the validation loss at the checkpoint's step from the run's history; a model
    folder copied away from its run still loads, only without that figure."""
    from llm_ray.checkpoint.best import read_state, val_loss_at_step

    folder = Location(str(tmp_path / "run" / "history"))
    write_history(folder, 0, 20, [{"step": 10, "train_loss": 5.0}, {"step": 20, "train_loss": 4.0},
                                  {"step": 20, "val_loss": 4.2}])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"")
    (model_dir / "train_state.json").write_text(json.dumps(
        {"step": 20, "history": [], "history_dir": folder.uri, "history_through": 20}))
    assert read_state(model_dir)["history"] == [{"step": 20, "train_loss": 4.0}, {"step": 20, "val_loss": 4.2}]
    assert val_loss_at_step(read_state(model_dir)) == 4.2
    shutil.rmtree(tmp_path / "run")
    assert val_loss_at_step(read_state(model_dir)) is None


# ------------------------------------------------------------------ real checkpoints of an in-process run


class Crash(Exception):
    pass


def one_worker(tmp_path, *overrides):
    from llm_ray.config import load_config

    return load_config("debug", ["train.num_workers=1", "train.total_batch_tokens=512", f"output_dir={tmp_path}",
                                 "name=run", "train.max_steps=60", "train.log_every=5", "train.eval_every=20",
                                 "train.checkpoint_every=10", *overrides])


def random_blocks(cfg, folder: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        np.save(folder / f"{split}.npy", rng.integers(0, cfg.vocab_size, (64, cfg.data.block_size + 1),
                                                     dtype=np.uint16))


def fresh_engine(cfg):
    from llm_ray.config import model_spec
    from llm_ray.model import GPT
    from llm_ray.train.engine import build_engine

    torch.manual_seed(cfg.seed)
    return build_engine(GPT(model_spec(cfg)), cfg)


def train_on(cfg, engine, state, folder: Path, crash_at: int | None = None):
    """run_training with the workers' own save_checkpoint into <folder>/checkpoints/checkpoint_<step>. At
    crash_at, the save dies before its manifest is written (a node lost mid-save)."""
    from llm_ray.train.data import BlockOrder, MicroBatches, PackedBlocks, validation_batches
    from llm_ray.train.loop import run_training
    from llm_ray.checkpoint.manifest import MANIFEST_DIR
    from llm_ray.train.worker import open_history, save_checkpoint

    micro = cfg.train.micro_batch_size
    blocks = PackedBlocks([folder / "train.npy"])
    batches = MicroBatches(blocks, BlockOrder(len(blocks), cfg.seed), state.samples, 0, 1, micro)
    val = [(torch.from_numpy(b), w) for b, w in
           validation_batches(PackedBlocks([folder / "val.npy"]), 2 * micro, cfg.seed, 0, 1, micro)]

    def save(state, metrics):
        directory = folder / "checkpoints" / f"checkpoint_{state.step:06d}"
        save_checkpoint(str(directory), engine, cfg, state, "{}", 0, 1)
        if state.step == crash_at:
            shutil.rmtree(directory / MANIFEST_DIR)
            raise Crash

    open_history(state, cfg, 0)
    return run_training(cfg, engine, batches, val, state, save, lambda m: None, 0, torch.device("cpu"),
                        log=lambda line: None)


def resume(cfg, folder: Path):
    """The newest complete checkpoint, loaded as a restarted worker does: (engine, state)."""
    from pyarrow import fs

    from llm_ray.checkpoint.manifest import find_resume_point
    from llm_ray.train.worker import DS_DIR, DS_TAG, resumed_state

    point = find_resume_point(fs.LocalFileSystem(), str(folder / "checkpoints"))
    engine = fresh_engine(cfg)
    _, client_state = engine.load_checkpoint(str(Path(point.path) / DS_DIR), tag=DS_TAG)
    return engine, resumed_state(client_state["train_state"], cfg, 1, None, None), point


def file_sizes(checkpoint: Path) -> dict[str, int]:
    return {p.relative_to(checkpoint).as_posix(): p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()}


def essentials(history: list[dict]) -> list[tuple]:
    """What a resumed run must reproduce (not the timings): step, losses and LR of each entry."""
    return [(h["step"], *(round(h[k], 5) if k in h else None for k in ("train_loss", "lr", "val_loss")))
            for h in history]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, process_group):
    """60 steps uninterrupted, a checkpoint every 10: (config, run folder)."""
    from llm_ray.checkpoint import TrainState

    folder = tmp_path_factory.mktemp("straight")
    cfg = one_worker(folder)
    random_blocks(cfg, folder)
    train_on(cfg, fresh_engine(cfg), TrainState(world_size=1), folder)
    return cfg, folder


@pytest.mark.slow
def test_a_checkpoint_does_not_grow_with_the_run(straight):
    """Every file of the checkpoint at step 60 has the size of its counterpart at step 10 (give or take
    a few bytes of longer counters), while the run logged kilobytes of history in between."""
    cfg, folder = straight
    early = file_sizes(folder / "checkpoints" / "checkpoint_000010")
    late = file_sizes(folder / "checkpoints" / "checkpoint_000060")
    assert sorted(early) == sorted(late)
    tolerance = 64  # torch's zip format aligns each record to 64 bytes: a longer integer can cross one
    grown = {name: late[name] - early[name] for name in late if abs(late[name] - early[name]) > tolerance}
    assert not grown, grown
    history = cfg.run_dir / "history"
    logged_since = sum(p.stat().st_size for p in history.iterdir() if int(p.stem.split("-")[1]) > 10)
    assert logged_since > 20 * tolerance  # what each checkpoint would have grown by, copying the history
    state = read_train_state(folder / "checkpoints" / "checkpoint_000060", history=False)
    assert state["history"] == [] and state["history_through"] == 60
    assert state["history_dir"] == str(history)


@pytest.mark.slow
def test_a_resumed_run_has_the_history_of_an_uninterrupted_one(straight, tmp_path):
    """A run dies while saving its checkpoint at step 40, after the history of steps 31-40 was written.
    Rerun from the checkpoint at 30 with checkpoints every 15 steps: the crashed run's file is
    discarded, and the history read from the final checkpoint is the uninterrupted run's, each
    entry once."""
    from llm_ray.checkpoint import TrainState

    straight_cfg, straight_folder = straight
    cfg = one_worker(tmp_path)
    random_blocks(cfg, tmp_path)
    with pytest.raises(Crash):
        train_on(cfg, fresh_engine(cfg), TrainState(world_size=1), tmp_path, crash_at=40)
    history = cfg.run_dir / "history"
    assert "0000000030-0000000040.jsonl" in history_names(history)

    cfg.train.checkpoint_every = 15
    engine, state, point = resume(cfg, tmp_path)
    assert Path(point.path).name == "checkpoint_000030" and state.step == 30
    train_on(cfg, engine, state, tmp_path)
    assert history_names(history) == ["0000000000-0000000010.jsonl", "0000000010-0000000020.jsonl",
                                      "0000000020-0000000030.jsonl", "0000000030-0000000045.jsonl",
                                      "0000000045-0000000060.jsonl"]
    expected = read_train_state(straight_folder / "checkpoints" / "checkpoint_000060")["history"]
    resumed = read_train_state(tmp_path / "checkpoints" / "checkpoint_000060")["history"]
    assert [h["step"] for h in resumed if "train_loss" in h] == list(range(5, 61, 5))
    assert [h["step"] for h in resumed if "val_loss" in h] == [0, 20, 40, 60]
    assert essentials(resumed) == essentials(expected)
    # The checkpoint at 30 still reads its own history: up to step 30 only.
    at_30 = read_train_state(tmp_path / "checkpoints" / "checkpoint_000030")["history"]
    assert essentials(at_30) == [e for e in essentials(expected) if e[0] <= 30]
