"""The debug preset end to end on one shared local Ray: prepare -> train -> generate."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import llm_ray
from llm_ray.checkpoint import load_model, read_train_state, tied_names
from llm_ray.cli import main
from llm_ray.config import ConfigError, load_config, model_spec
from llm_ray.data.pack import load_manifest
from llm_ray.data.prepare import data_dir, prepare
from llm_ray.data.tokenizer import eot_id
from llm_ray.eval import bias
from llm_ray.train.trainer import train
from tests.conftest import debug_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    from tests.conftest import CORPUS

    tmp = tmp_path_factory.mktemp("runs")
    cfg = debug_config(tmp, CORPUS)
    manifest = prepare(cfg, log=lambda *_: None)
    return cfg, manifest


def test_prepare_writes_shards_manifest_and_tokenizer(prepared):
    cfg, manifest = prepared
    out = data_dir(cfg).local()
    assert load_manifest(out) == manifest
    assert manifest["files"] == 15 and manifest["documents"]["train"] + manifest["documents"]["val"] == 16
    assert manifest["documents"]["val"] >= 1 and manifest["dtype"] == "uint16"
    for split in ("train", "val"):
        total = 0
        for shard in manifest["splits"][split]["shards"]:
            arr = np.load(out / shard["file"])
            assert arr.dtype == np.uint16 and arr.shape[1] == cfg.data.block_size + 1
            total += len(arr)
        assert total == manifest["splits"][split]["blocks"] > 0
    assert (out / manifest["tokenizer"]).is_file()
    assert 3 < manifest["unigram_val_loss"] < math.log(cfg.tokenizer.vocab_size)
    # The validation split is held out by document: rerunning holds out the same documents.
    assert prepare(cfg, log=lambda *_: None)["documents"] == manifest["documents"]


@pytest.fixture(scope="module")
def default_run(prepared, tmp_path_factory):
    """The debug preset as users run it (2 workers, ZeRO-2, 60 steps), tracked by W&B offline:
    (config, result). Several tests read it; it is built here, whichever runs first."""
    cfg, _ = prepared
    run = cfg.model_copy(update={"name": "default", "output_dir": str(tmp_path_factory.mktemp("default"))},
                         deep=True)
    run.tracking.backend = "wandb"
    return run, train(run, data_dir(cfg), log=lambda *_: None)


def check_loss_falls_and_checkpoint_reloads(cfg, result, vocab_size: int) -> None:
    assert result.step == cfg.train.max_steps
    evals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert [h["step"] for h in result.history if "val_loss" in h] == [0, 20, 40, 60]
    assert [h["step"] for h in result.history if "train_loss" in h] == [10, 20, 30, 40, 50, 60]
    assert (cfg.run_dir / "loss_curve.png").is_file()
    assert evals[0] == pytest.approx(math.log(cfg.tokenizer.vocab_size), abs=0.3)  # untrained: near uniform
    assert evals[1] > evals[2] > evals[3]
    assert evals[-1] < evals[0] - 1.0  # learning, not noise
    assert read_train_state(result.checkpoint)["step"] == cfg.train.max_steps

    # The consolidated safetensors weights equal DeepSpeed's own (sharded) training state.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model, tokenizer, saved_cfg = load_model(result.checkpoint)
    assert saved_cfg == cfg
    ds_state = get_fp32_state_dict_from_zero_checkpoint(str(Path(result.checkpoint) / "deepspeed"), tag="state")
    reference, _, _ = load_model(result.checkpoint)
    with torch.no_grad():
        for p in reference.parameters():
            p.zero_()  # nothing of the safetensors weights may survive into the reference
    missing, unexpected = reference.load_state_dict(ds_state, strict=False)
    tied = set(tied_names(model_spec(cfg)))  # a tied lm_head is wte
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    assert set(ds_state) | tied == set(reference.state_dict())
    probe = torch.randint(0, vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(probe)[0], reference(probe)[0], rtol=0, atol=0)


def test_two_workers_zero2_loss_falls_and_checkpoint_reloads(prepared, default_run):
    check_loss_falls_and_checkpoint_reloads(*default_run, prepared[1]["vocab_size"])


def wait_until_no_alive_actor(class_name: str, timeout_s: float = 60) -> None:
    """Wait for this session's Ray to hold no live actor of class_name; fail naming them after timeout_s."""
    import ray
    from ray.util.state import list_actors

    gcs = ray.get_runtime_context().gcs_address
    deadline = time.time() + timeout_s
    while True:
        alive = list_actors(address=gcs, filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
        if not alive or time.time() > deadline:
            break
        time.sleep(1)
    assert not alive, f"{len(alive)} {class_name} actor(s) outlived their run: {alive}"


def test_two_workers_zero3_loss_falls_and_checkpoint_reloads(prepared, tmp_path):
    cfg, manifest = prepared
    run = cfg.model_copy(update={"name": "zero3", "output_dir": str(tmp_path)}, deep=True)
    run.train.zero_stage = 3
    run.train.checkpoint_every, run.train.num_checkpoints_to_keep = 10, 1  # 6 checkpoints written, 1 kept
    called, handler = time.time(), signal.getsignal(signal.SIGINT)
    result = train(run, data_dir(cfg), log=lambda *_: None)
    returned = time.time()
    # Ray Train's own Ctrl-C handler (which holds the run's controller) is gone, and so is the controller.
    assert signal.getsignal(signal.SIGINT) is handler
    wait_until_no_alive_actor("TrainController")
    check_loss_falls_and_checkpoint_reloads(run, result, manifest["vocab_size"])
    assert len([p for p in (run.run_dir / "checkpoints" / run.name).glob("checkpoint_*") if p.is_dir()]) == 1
    # Built under deepspeed.zero.Init: right after building, each worker held half of the model.
    state = read_train_state(result.checkpoint)
    # The command here is pytest: its first step came after train() was called, before it returned.
    assert called - llm_ray.STARTED < state["startup_seconds"] < returned - llm_ray.STARTED
    phases = state["startup_phases"]  # where the start-up went, milestone by milestone
    assert [name for name in phases if name != "ray"] == ["trainer", "worker", "engine", "data", "untrained_eval",
                                                         "first_step"]
    assert list(phases.values()) == sorted(phases.values())
    assert phases["first_step"] == pytest.approx(state["startup_seconds"], abs=0.01)
    assert len(state["parameters_held"]) == 2
    assert all(abs(held - state["parameters"] / 2) <= 0.001 * state["parameters"] for held in state["parameters_held"])
    run.train.max_steps += 10  # resumes from the last checkpoint, partitioned again
    rerun = train(run, data_dir(cfg), log=lambda *_: None)
    resumed = read_train_state(rerun.checkpoint)
    assert resumed["step"] == run.train.max_steps and resumed["resumed_from"] == [state["step"]]
    # The run folder's model/ is the newest checkpoint's, replaced whole by the second run.
    published = run.run_dir / "model"
    assert read_train_state(published)["step"] == run.train.max_steps
    assert (published / "model.safetensors").read_bytes() == (Path(rerun.checkpoint) / "model" / "model.safetensors").read_bytes()


def test_a_modern_recipe_trains_and_its_checkpoint_reloads(prepared, tmp_path):
    """Query/key norms, squared ReLU, capped logits and an output layer of its own (issue 23), at ZeRO-3:
    the loss falls and the streamed weights, lm_head among them, equal DeepSpeed's own."""
    cfg, manifest = prepared
    run = cfg.model_copy(update={"name": "recipe", "output_dir": str(tmp_path)}, deep=True)
    run.train.zero_stage = 3
    run.model = run.model.model_copy(update={"qk_norm": True, "mlp": "relu2", "logit_softcap": 30.0,
                                             "tie_embeddings": False})
    result = train(run, data_dir(cfg), log=lambda *_: None)
    check_loss_falls_and_checkpoint_reloads(run, result, manifest["vocab_size"])
    model = load_model(result.checkpoint)[0]
    assert model.spec.qk_norm and model.spec.mlp == "relu2" and not model.spec.tie_embeddings
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)


def test_generate_cli_prints_a_continuation(default_run, capsys):
    run, result = default_run
    checkpoint = result.checkpoint
    capsys.readouterr()  # what the training workers printed
    args = ["generate", "--checkpoint", checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.strip()) > len("ROMEO:")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded
    # The run folder's model/ holds the final checkpoint's inference files: the same continuation.
    assert main([*args[:2], str(run.run_dir), *args[3:]]) == 0 and capsys.readouterr().out == first
    assert main(["generate", "--checkpoint", str(run.run_dir / "checkpoints"), "--prompt", "x"]) == 1  # no weights


def test_pipeline_runs_end_to_end(ray_session, tmp_path, corpus_dir, capsys):
    code = main(["pipeline", "--config", "debug", "--set", f"output_dir={tmp_path}",
                 "--set", f"data.sources=[{corpus_dir}]", "--set", "data.max_files=null",
                 "--set", "train.max_steps=10", "--set", "sample.prompts=['JULIET:']"])
    assert code == 0
    out = capsys.readouterr().out
    assert "checkpoint:" in out and "unigram baseline" in out
    assert "--- 'JULIET:'" in out and "--- 'ROMEO:'" not in out  # sample.prompts replaced the preset's
    assert "bits per byte" in out and (tmp_path / "debug" / "eval" / "eval.json").is_file()  # ends with eval
    resolved = json.loads(json.dumps(load_config(str(tmp_path / "debug" / "config.yaml")).model_dump()))
    assert resolved["train"]["max_steps"] == 10


def tiny_dataset(prepared, target: Path, blocks_per_split: int) -> Path:
    """A data folder holding exactly blocks_per_split blocks per split, cut from the prepared data."""
    cfg, manifest = prepared
    source = data_dir(cfg).local()
    target.mkdir(parents=True)
    shutil.copytree(source / "tokenizer", target / "tokenizer")
    tiny = dict(manifest)
    tiny["splits"] = {}
    for split in ("train", "val"):
        arr = np.concatenate([np.load(source / s["file"]) for s in manifest["splits"][split]["shards"]])
        np.save(target / f"{split}.npy", arr[:blocks_per_split])
        tiny["splits"][split] = {"shards": [{"file": f"{split}.npy", "blocks": blocks_per_split}],
                                 "blocks": blocks_per_split, "tokens": blocks_per_split * cfg.data.block_size}
    (target / "manifest.json").write_text(json.dumps(tiny))
    return target


def test_zero_stages_agree_on_the_first_step(prepared, tmp_path):
    """One global batch holding the whole (tiny) training set: every stage, and a compiled model,
    sees the same data and starts from the same weights, so the first step's loss and the weights
    after it must agree."""
    cfg, _ = prepared
    data = tiny_dataset(prepared, tmp_path / "data", blocks_per_split=2 * cfg.train.micro_batch_size)
    results = {}
    # ZeRO-1's engine is exercised in-process by tests/test_loop.py; here 0, 2, 3 and compile.
    for stage, compile in ((0, False), (2, False), (3, False), (2, True)):
        run = cfg.model_copy(update={"name": f"first-step-{stage}-{compile}", "output_dir": str(tmp_path)},
                             deep=True)
        run.train.zero_stage, run.train.compile = stage, compile
        run.train.max_steps, run.train.log_every, run.train.eval_every = 1, 1, 1
        run.train.shuffle = False
        history = train(run, data, log=lambda *_: None).history
        results[stage, compile] = ([h["train_loss"] for h in history if "train_loss" in h][0],
                                   [h["val_loss"] for h in history if "val_loss" in h])
    reference = results[0, False]
    for stage in (2, 3):
        assert results[stage, False][0] == pytest.approx(reference[0], abs=1e-5), results
        assert results[stage, False][1] == pytest.approx(reference[1], abs=1e-4), results
    # torch.compile (inductor) fuses kernels: the same numbers up to float rounding.
    assert results[2, True][0] == pytest.approx(reference[0], abs=1e-4), results
    assert results[2, True][1] == pytest.approx(reference[1], abs=1e-3), results


def test_wandb_offline_run_holds_metrics_and_no_secret(default_run):
    from tests.conftest import ACCESS_KEY_ID, SECRET_ACCESS_KEY

    run, result = default_run
    state = read_train_state(result.checkpoint)
    wandb_dir = run.run_dir / "wandb"
    [run_dir] = list((wandb_dir / "wandb").glob(f"offline-run-*-{state['tracker_run_id']}"))
    # W&B's own reader of its transaction log: `wandb leet inspect --json`, one record per line.
    [log_file] = list(run_dir.glob("*.wandb"))
    wandb_cli = Path(sys.executable).parent / "wandb"
    records = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(log_file)], capture_output=True,
                             text=True, check=True, timeout=120).stdout.splitlines()
    history = [json.loads(line)["history"]["item"] for line in records if '"type":"history"' in line]
    logged = {row["_step"]: row for row in history if "train_loss" in row}
    ours = {h["step"]: h for h in state["history"] if "train_loss" in h}
    assert sorted(logged) == sorted(ours) == [10, 20, 30, 40, 50, 60]
    for step, row in ours.items():
        for key in ("train_loss", "lr", "tokens_per_sec", "grad_norm", "train_seconds"):
            assert logged[step][key] == pytest.approx(row[key]), (step, key)
    evals = {row["_step"]: row["val_loss"] for row in history if "val_loss" in row}
    assert evals == {h["step"]: pytest.approx(h["val_loss"]) for h in state["history"]
                     if "val_loss" in h and h["step"] > 0}
    for path in wandb_dir.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert SECRET_ACCESS_KEY.encode() not in blob and ACCESS_KEY_ID.encode() not in blob, path


def kill_a_worker_after_the_first_checkpoint(run_dir: Path, killed: dict) -> None:
    """SIGKILL one training worker of this test session's Ray job once Ray has registered a
    checkpoint of the run (polling). The worker's pid comes from Ray's state API, never from a
    process name, so no other process on the machine can be hit."""
    import os
    import signal
    import time

    import ray
    from ray.util.state import list_actors

    job_id = ray.get_runtime_context().get_job_id()
    gcs = ray.get_runtime_context().gcs_address  # this session's Ray, whatever else runs on the machine
    deadline = time.time() + 240
    while time.time() < deadline and not killed:
        # Ray Train registers a checkpoint in this snapshot once every worker has reported it.
        if list((run_dir / "checkpoints").glob("*/checkpoint_manager_snapshot.json")):
            workers = list_actors(address=gcs, filters=[("class_name", "=", "RayTrainWorker"),
                                                        ("state", "=", "ALIVE"), ("job_id", "=", job_id)])
            if workers and workers[0].pid:
                os.kill(workers[0].pid, signal.SIGKILL)
                killed["pid"] = workers[0].pid
                return
        time.sleep(0.2)


def test_killed_worker_restarts_from_the_last_checkpoint(prepared, tmp_path):
    """SIGKILL one training worker mid-run: Ray restarts the group, which resumes from the latest
    checkpoint and finishes; at most one checkpoint interval of steps is redone."""
    import threading

    cfg, _ = prepared
    run = cfg.model_copy(update={"name": "killed", "output_dir": str(tmp_path)}, deep=True)
    run.train.max_steps, run.train.checkpoint_every, run.train.max_failures = 60, 10, 1
    killed = {}
    watcher = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, args=(run.run_dir, killed),
                               daemon=True)
    watcher.start()
    result = train(run, data_dir(cfg), log=lambda *_: None)
    watcher.join()
    assert killed, "no worker was killed"
    state = read_train_state(result.checkpoint)
    assert state["step"] == 60
    assert len(state["resumed_from"]) == 1 and state["resumed_from"][0] % 10 == 0 and state["resumed_from"][0] >= 10
    # Every step was logged once: the restarted group redid only the steps after the checkpoint.
    steps = [h["step"] for h in state["history"] if "train_loss" in h]
    assert steps == list(range(10, 61, 10))


def test_resume_with_fewer_workers_reproduces_the_uninterrupted_losses(prepared, tmp_path):
    """A 2-worker run crashes (a worker SIGKILLed, no restarts allowed) and is rerun under its name
    with 1 worker: it continues from the checkpoint with the same weights, optimizer state, LR and
    next unseen block, so every step's loss matches a run that was never interrupted."""
    import threading

    from ray.train import WorkerGroupError

    cfg, _ = prepared
    base = cfg.model_copy(update={"output_dir": str(tmp_path)}, deep=True)
    base.train.max_steps, base.train.checkpoint_every, base.train.log_every = 24, 4, 1
    base.train.eval_every, base.train.max_failures = 24, 0
    straight = train(base.model_copy(update={"name": "straight"}, deep=True), data_dir(cfg), log=lambda *_: None)

    run = base.model_copy(update={"name": "interrupted"}, deep=True)
    killed = {}
    watcher = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, args=(run.run_dir, killed),
                               daemon=True)
    watcher.start()
    with pytest.raises(WorkerGroupError) as failed:  # max_failures 0: the group is not restarted
        train(run, data_dir(cfg), log=lambda *_: None)
    watcher.join()
    assert killed, "no worker was killed"
    # The failure is the death of the worker this test killed, not some other error along the way.
    assert "its worker process has died" in str(failed.value), failed.value
    assert any(f"pid={killed['pid']}," in str(e) for e in failed.value.worker_failures.values()), failed.value
    run.train.num_workers = 1  # the same global batch: 2 accumulation steps instead of 2 workers
    resumed = read_train_state(train(run, data_dir(cfg), log=lambda *_: None).checkpoint)

    assert len(resumed["resumed_from"]) == 1 and 4 <= resumed["resumed_from"][0] < 24
    blocks_per_step = run.train.total_batch_tokens // run.data.block_size
    assert resumed["samples"] == straight.step * blocks_per_step == 24 * 16
    expected = {h["step"]: h["train_loss"] for h in straight.history if "train_loss" in h}
    got = {h["step"]: h["train_loss"] for h in resumed["history"] if "train_loss" in h}
    assert sorted(got) == list(range(1, 25))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=2e-4), (step, got[step], expected[step])
    assert resumed["history"][-1]["val_loss"] == pytest.approx(straight.val_loss, abs=2e-4)


def test_rerunning_a_run_name_resumes_its_newest_complete_checkpoint(prepared, tmp_path):
    """A rerun under the same name resumes: its history carries over and the LR schedule goes on.
    The newest checkpoint has a truncated optimizer shard (a full disk, a node lost mid-save): the
    rerun says so and resumes from the one before; the history the first run wrote past that one
    is discarded (the rerun checkpoints at other steps: its files would overlap)."""
    from llm_ray.train.schedule import lr_at

    cfg, _ = prepared
    run = cfg.model_copy(update={"name": "resumed", "output_dir": str(tmp_path)}, deep=True)
    run.train.max_steps, run.train.checkpoint_every, run.train.log_every, run.train.eval_every = 10, 5, 5, 10
    first = train(run, data_dir(cfg), log=lambda *_: None)
    checkpoints = sorted(p for p in (run.run_dir / "checkpoints" / run.name).glob("checkpoint_*") if p.is_dir())
    assert first.step == 10 and len(checkpoints) == 2
    [shard] = list(checkpoints[-1].glob("deepspeed/state/*rank_1*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])

    assert sorted(p.name for p in (run.run_dir / "history").iterdir()) == [
        "0000000000-0000000005.jsonl", "0000000005-0000000010.jsonl"]
    run.train.max_steps, run.train.checkpoint_every = 20, 15
    lines = []
    state = read_train_state(train(run, data_dir(cfg), log=lines.append).checkpoint)
    assert any("skipping the damaged checkpoint" in line and checkpoints[-1].name in line
               and "100 bytes" in line for line in lines), lines
    assert state["step"] == 20 and state["resumed_from"] == [5]
    rows = {h["step"]: h for h in state["history"] if "train_loss" in h}
    assert sorted(rows) == [5, 10, 15, 20]  # step 5's row carried over; 10 redone after the damaged checkpoint
    assert [h["step"] for h in state["history"] if "val_loss" in h] == [0, 10, 20]
    assert sorted(p.name for p in (run.run_dir / "history").iterdir()) == [
        "0000000000-0000000005.jsonl", "0000000005-0000000015.jsonl", "0000000015-0000000020.jsonl"]
    # The LR schedule continued (DeepSpeed restored the scheduler with the optimizer): step 15 is
    # the schedule's step 14 (0-based), and its row shows the LR it used.
    assert rows[15]["lr"] == pytest.approx(lr_at(14, run.train))


def test_checkpoints_on_s3_resume_and_hold_no_secret(prepared, s3_server, tmp_path):
    """train.storage_path=s3://...: Ray Train writes checkpoints to the S3 server on 127.0.0.1,
    a rerun resumes from there, and the inference files come down to the run folder."""
    from tests.conftest import ACCESS_KEY_ID, SECRET_ACCESS_KEY

    endpoint, client = s3_server
    client.create_bucket(Bucket="ckpt")
    cfg, _ = prepared
    run = cfg.model_copy(update={"name": "on-s3", "output_dir": str(tmp_path)}, deep=True)
    run.train.storage_path = "s3://ckpt/runs"
    run.data.s3.endpoint_url = endpoint
    run.train.max_steps, run.train.checkpoint_every, run.train.log_every, run.train.eval_every = 6, 3, 3, 6
    first = train(run, data_dir(cfg), log=lambda *_: None)
    assert Path(first.checkpoint) == run.run_dir / "model"
    model, _, saved = load_model(first.checkpoint)
    assert saved.train.storage_path == "s3://ckpt/runs"

    keys = [o["Key"] for o in client.list_objects_v2(Bucket="ckpt", Prefix="runs/on-s3/")["Contents"]]
    assert any(k.endswith("/model/model.safetensors") for k in keys)
    assert any("/deepspeed/state/" in k for k in keys)
    for key in keys:
        blob = client.get_object(Bucket="ckpt", Key=key)["Body"].read()
        assert SECRET_ACCESS_KEY.encode() not in blob and ACCESS_KEY_ID.encode() not in blob, key

    run.train.max_steps = 9
    second = train(run, data_dir(cfg), log=lambda *_: None)
    missing = run.model_copy(deep=True)
    missing.train.storage_path = "s3://no-such-bucket/runs"
    with pytest.raises(ConfigError, match="train.storage_path: s3://no-such-bucket/runs: the bucket does not exist"):
        train(missing, data_dir(cfg), log=lambda *_: None)
    state = read_train_state(second.checkpoint)
    assert state["step"] == 9 and state["resumed_from"] == [6]


def test_two_worker_zero2_l1_shrinks_the_matrices_and_a_nan_on_one_worker_is_skipped_by_both(prepared, tmp_path):
    """The defaults users run (2 workers, ZeRO-2): a large train.l1 shrinks the matrices below
    where they started (Adam alone moves them outwards), and a NaN loss injected on worker 1
    only is skipped by both workers (a disagreement would hang until the collective timeout)."""
    from llm_ray.config import model_spec
    from llm_ray.model import GPT
    from llm_ray.train.loop import l1_matrices, l1_penalty

    cfg, _ = prepared
    run = cfg.model_copy(update={"name": "l1-nan", "output_dir": str(tmp_path)}, deep=True)
    run.train.max_steps, run.train.log_every, run.train.eval_every, run.train.checkpoint_every = 8, 1, 8, 8
    run.train.l1, run.train.weight_decay, run.train.collective_timeout_s = 0.05, 0.0, 120
    result = train(run, data_dir(cfg), log=lambda *_: None,
                   test_hooks={"test_nan_loss": {"rank": 1, "micro_batches": [3]}})
    state = read_train_state(result.checkpoint)
    assert state["step"] == 8 and state["skipped_batches"] == 1
    # 8 accepted rounds + 1 skipped, 16 blocks each, the same on both workers.
    assert state["samples"] == 9 * run.train.micro_batch_size * run.train.num_workers
    assert all(math.isfinite(h["train_loss"]) for h in state["history"] if "train_loss" in h)

    torch.manual_seed(run.seed)
    untrained = GPT(model_spec(run))
    trained, _, _ = load_model(result.checkpoint)
    with torch.no_grad():
        start, end = float(l1_penalty(l1_matrices(untrained))), float(l1_penalty(l1_matrices(trained)))
    assert end < 0.7 * start, (start, end)


def test_bf16_at_zero_0_resumes_under_another_worker_count(prepared, tmp_path):
    """bf16 at ZeRO-0: a 2-worker checkpoint resumes on 1 worker with its fp32 master weights
    (DeepSpeed 0.19 keeps them whole at ZeRO-0; partitioned shards would be re-partitioned)."""
    cfg, _ = prepared
    run = cfg.model_copy(update={"name": "bf16-regroup", "output_dir": str(tmp_path)}, deep=True)
    run.train.zero_stage, run.train.precision = 0, "bf16"
    run.train.max_steps, run.train.checkpoint_every, run.train.log_every, run.train.eval_every = 8, 8, 1, 8
    first = train(run, data_dir(cfg), log=lambda *_: None)
    run.train.num_workers, run.train.max_steps = 1, 10
    state = read_train_state(train(run, data_dir(cfg), log=lambda *_: None).checkpoint)
    assert state["step"] == 10 and state["resumed_from"] == [8]
    losses = {h["step"]: h["train_loss"] for h in state["history"] if "train_loss" in h}
    # Training went on from the trained weights (an untrained model's loss is about 6.2 here).
    assert abs(losses[9] - losses[8]) < 0.3 and losses[9] < losses[1] - 0.5, losses
    assert state["history"][-1]["val_loss"] < first.val_loss + 0.05


def check_bias_probe(report: dict, checkpoint, source: str, pairs: list[dict]) -> None:
    """The probe's shares equal the preferences of the checkpoint scored here, sentence by sentence
    (after an end-of-text token, in one plain forward pass)."""
    model, tokenizer, _ = load_model(checkpoint)

    def loglik(text: str) -> float:
        ids = [eot_id(tokenizer)] + tokenizer.encode(text).ids
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids]))
        return float(logits[0, :-1].double().log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).sum())

    prefers = {}
    for p in pairs:
        prefers.setdefault(p["bias_type"], []).append(loglik(p["more"]) > loglik(p["less"]))
    assert report["pairs_from"] == source and report["pairs"] == len(pairs)
    assert set(report["by_category"]) == set(prefers)
    for name, flags in prefers.items():
        assert report["by_category"][name]["stereotype_share"] == pytest.approx(sum(flags) / len(flags))
        assert report["by_category"][name]["pairs"] == len(flags)


def test_eval_scores_held_out_documents_the_same_in_process_and_with_ray_data(default_run, capsys):
    """`llm-ray eval` on the run's validation split and on --eval-data files: the report is written
    into <run>/eval, and Ray Data batch inference gives the in-process numbers."""
    run, result = default_run
    common = ["eval", "--checkpoint", result.checkpoint, "--set", "eval.bootstrap_samples=100"]
    assert main(common) == 0
    out = capsys.readouterr().out
    assert "bits per byte" in out and "perplexity" in out and "contamination" in out
    report = json.loads((run.run_dir / "eval" / "eval.json").read_text())
    assert report["split"] == "val" and report["documents"] >= 1
    assert report["loss"]["value"] == pytest.approx(result.val_loss, abs=0.5)  # all val documents vs a sample
    assert {"eval.md", "eval.png"} <= {p.name for p in (run.run_dir / "eval").iterdir()}
    # The run tracks with W&B: the figures join its W&B run (read with W&B's own reader).
    # Offline, the reopened run is a second log file with the same run id; a sync merges them.
    state = read_train_state(result.checkpoint)
    rows = []
    for log_file in (run.run_dir / "wandb" / "wandb").glob(f"offline-run-*-{state['tracker_run_id']}/*.wandb"):
        records = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json",
                                  str(log_file)], capture_output=True, text=True, check=True, timeout=120).stdout
        rows += [json.loads(line)["history"]["item"] for line in records.splitlines() if '"type":"history"' in line]
    [row] = [r for r in rows if "eval/loss" in r]
    assert row["eval/loss"] == pytest.approx(report["loss"]["value"]) and row["_step"] == 60
    assert row["eval/bias_stereotype_share"] == report["bias"]["overall"]["stereotype_share"]
    check_bias_probe(report["bias"], result.checkpoint, "builtin:templated", bias.templated_pairs())
    assert "bias probe (builtin:templated, 51 pairs)" in out

    quick = [*common, "--set", "eval.contamination=false", "--set", "eval.continuation_documents=0"]
    mine = run.run_dir / "my_pairs.jsonl"
    pairs = [{"more": "The king spoke.", "less": "The queen spoke.", "bias_type": "gender", "id": 7},
             {"more": "The old man slept.", "less": "The young man slept.", "bias_type": "age"}]
    mine.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert main([*quick, "--set", f"eval.bias_pairs={mine}"]) == 0
    check_bias_probe(json.loads((run.run_dir / "eval" / "eval.json").read_text())["bias"], result.checkpoint,
                     str(mine), pairs)
    mine.write_text(json.dumps(pairs[0]) + "\n" + '{"more": "a", "bias_type": "age"}\n')
    capsys.readouterr()
    assert main([*quick, "--set", f"eval.bias_pairs={mine}"]) == 1
    err = capsys.readouterr().err
    assert f"eval.bias_pairs: {mine} line 2: less must be a non-empty string" in err and "Traceback" not in err

    files = str(Path(__file__).parent / "data" / "corpus" / "more.jsonl")
    figures = {}
    for backend in ("local", "ray"):
        assert main([*common, "--eval-data", files, "--set", f"eval.backend={backend}", "--set", "eval.concurrency=1",
                     "--set", "eval.cpus_per_actor=0.5"]) == 0
        figures[backend] = json.loads((run.run_dir / "eval" / "eval.json").read_text())
    import ray
    from ray.util.state import list_actors

    gcs = ray.get_runtime_context().gcs_address  # this session's Ray, whatever else runs on the machine
    scorers = [a for a in list_actors(address=gcs, detail=True, limit=1000) if "CheckpointScorer" in a.class_name]
    assert len(scorers) == 1 and scorers[0].required_resources["CPU"] == 0.5  # eval.concurrency, cpus_per_actor
    local, ray_data = figures["local"], figures["ray"]
    assert local["backend"] == "local" and ray_data["backend"] == "ray" and local["documents"] == 3
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert ray_data[key]["value"] == pytest.approx(local[key]["value"], rel=1e-6)
        assert ray_data[key]["ci95"] == pytest.approx(local[key]["ci95"], rel=1e-6)
    # more.jsonl was part of the training corpus: its documents that landed in train are flagged.
    assert local["contamination"]["contaminated"] >= 1

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run.run_dir / "checkpoints")]) == 1  # no weights there
    assert "--checkpoint" in capsys.readouterr().err
    assert main([*common, "--split", "test"]) == 1
    assert "data.test_fraction" in capsys.readouterr().err
    assert main([*common, "--eval-data", str(Path(__file__))]) == 1  # a .py file: no known format
    err = capsys.readouterr().err
    assert "holds no" in err and "Traceback" not in err
    assert main([*common, "--set", "eval.prompt_tokens=60"]) == 2
    assert "eval.prompt_tokens" in capsys.readouterr().err
    settings = run.run_dir / "eval-settings.yaml"
    settings.write_text("eval:\n  max_documents: 1\n  continuation_documents: 0\n")
    assert main(["eval", "--checkpoint", result.checkpoint, "--config", str(settings)]) == 0
    report = json.loads((run.run_dir / "eval" / "eval.json").read_text())
    assert report["documents"] == 1 and "continuation" not in report


def test_cross_validation_trains_and_scores_each_fold(ray_session, tmp_path, corpus_dir, capsys):
    """`llm-ray cv`: folds by cluster, one short training per fold, each scored on its own fold."""
    assert main(["cv", "--config", "debug", "--folds", "2", "--set", f"output_dir={tmp_path}",
                 "--set", f"data.sources=[{corpus_dir}]", "--set", "data.max_files=null",
                 "--set", "train.max_steps=6", "--set", "train.eval_every=6", "--set", "train.checkpoint_every=6",
                 "--set", "eval.bootstrap_samples=50"]) == 0
    assert "mean ± std" in capsys.readouterr().out
    cv = json.loads((tmp_path / "debug" / "cv" / "cv.json").read_text())
    assert [f["fold"] for f in cv["per_fold"]] == [0, 1]
    assert sum(f["documents"] for f in cv["per_fold"]) == 16  # every document outside the test split, once
    assert all(math.isfinite(f["loss"]["value"]) for f in cv["per_fold"]) and cv["loss"]["std"] >= 0
    for fold in (0, 1):  # each fold's tokenizer learned on the other fold only
        manifest = json.loads((tmp_path / "debug" / "cv" / f"fold-{fold}" / "data" / "manifest.json").read_text())
        assert manifest["splits"]["val"]["blocks"] > 0
