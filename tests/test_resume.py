"""Checkpoint manifests and the choice of the checkpoint to resume from (no Ray: plain folders)."""

import json

import pytest
from pyarrow import fs

from llm_ray.checkpoint.manifest import ResumeError, find_resume_point, read_checkpoint_files, verify, write_manifest


def fake_checkpoint(folder, step, world=2):
    """A checkpoint folder as Ray Train assembles it from the workers' parts, with their manifests."""
    for rank in range(world):
        part = folder.parent / f".part-{folder.name}-{rank}"  # each worker writes its own folder
        (part / "deepspeed" / "state").mkdir(parents=True)
        (part / "deepspeed" / "state" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes(range(256)) * 40)
        if rank == 0:
            (part / "model").mkdir()
            (part / "model" / "train_state.json").write_text(json.dumps({"step": step, "world_size": world}))
            (part / "model" / "config.yaml").write_text("train:\n  zero_stage: 2\n")
            (part / "model" / "tokenizer.json").write_text("{}")
        write_manifest(part, rank, world)
        for path in part.rglob("*"):  # merged into one folder, as Ray uploads every worker's files
            if path.is_file():
                target = folder / path.relative_to(part)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return folder


def test_a_complete_checkpoint_verifies_and_damage_is_named(tmp_path):
    local = fs.LocalFileSystem()
    ckpt = fake_checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-00.000000", step=10)
    assert verify(local, str(ckpt)) is None
    shard = ckpt / "deepspeed" / "state" / "zero_pp_rank_1_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated, as a full disk leaves it
    assert "zero_pp_rank_1_optim_states.pt has 1000 bytes, 10240 were written" in verify(local, str(ckpt))
    shard.write_bytes(b"x" * 10240)  # same size, other bytes
    assert "does not match its checksum" in verify(local, str(ckpt))
    shard.unlink()
    assert "is missing" in verify(local, str(ckpt))
    (ckpt / "_manifest" / "rank-00001.json").unlink()
    assert "workers [1] of 2 are missing" in verify(local, str(ckpt))
    for m in (ckpt / "_manifest").iterdir():
        m.unlink()
    assert "no manifest" in verify(local, str(ckpt))


def test_the_newest_checkpoint_that_verifies_is_chosen(tmp_path):
    local = fs.LocalFileSystem()
    run = tmp_path / "run"
    older = fake_checkpoint(run / "checkpoint_2026-01-01_00-00-00.000000", step=10)
    newer = fake_checkpoint(run / "checkpoint_2026-01-01_00-05-00.000000", step=20)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own files are not checkpoints
    assert find_resume_point(local, str(run)).path == str(newer)

    (newer / "model" / "train_state.json").write_text("{}")  # damaged
    point = find_resume_point(local, str(run))
    assert point.path == str(older)
    assert point.skipped == [(str(newer), "model/train_state.json has 2 bytes, 29 were written")]
    state, config, tokenizer = read_checkpoint_files(local, point.path)
    assert state.step == 10 and config == {"train": {"zero_stage": 2}} and tokenizer == "{}"

    (older / "_manifest" / "rank-00000.json").unlink()
    with pytest.raises(ResumeError) as err:
        find_resume_point(local, str(run))
    message = str(err.value)
    assert str(run) in message and "--set name=" in message and "checkpoint_2026-01-01_00-00-00" in message


def test_a_run_without_checkpoints_starts_fresh(tmp_path):
    assert find_resume_point(fs.LocalFileSystem(), str(tmp_path / "no-such-run")).path is None


def test_a_restart_finds_complete_checkpoints_newer_than_rays_latest(tmp_path):
    """Ray registers a checkpoint only once its controller has every worker's report: when workers fail,
    newer complete ones may exist. A restart takes the newest: by manifests alone where each worker uploads
    its manifest last (S3), with checksums where Ray copied the folder in any order (local storage)."""
    from pyarrow import fs

    from llm_ray.checkpoint.manifest import newest_complete

    local = fs.LocalFileSystem()
    run = tmp_path / "run"
    for name, step in (("checkpoint_01", 10), ("checkpoint_02", 20), ("checkpoint_03", 30), ("checkpoint_04", 40)):
        fake_checkpoint(run / name, step)
    (run / "checkpoint_04" / "_manifest" / "rank-00001.json").unlink()  # a worker lost mid-save
    shard = next((run / "checkpoint_03").glob("deepspeed/state/*rank_1*"))
    shard.write_bytes(shard.read_bytes()[:10])  # its manifest was copied, its shard cut short
    assert newest_complete(local, str(run), "checkpoint_01") == str(run / "checkpoint_02")
    assert newest_complete(local, str(run), "checkpoint_01", checksums=False) == str(run / "checkpoint_03")
    assert newest_complete(local, str(run), "checkpoint_02") is None  # nothing newer is whole
    assert newest_complete(local, str(tmp_path / "none"), "") is None
