"""Races between concurrent runs and readers: the universal-checkpoint folder of a resume that changes
the worker count, publishing model/ under a reader, and a sweep's state in object storage."""

import os
from pathlib import Path

import pytest

from tests._race_workers import FakeContext, fake_to_universal


def test_two_runs_of_the_same_name_convert_into_folders_of_their_own(process_group, monkeypatch):
    """The folder was /tmp/llm-ray-universal-<experiment name>: a second run of that name on the machine
    would share it, and the first to finish would delete it under the other."""
    from llm_ray.train import worker

    monkeypatch.setattr(worker, "to_universal", fake_to_universal)
    with worker.universal_checkpoint("unused", FakeContext(0, 0)) as first:
        with worker.universal_checkpoint("unused", FakeContext(0, 0)) as second:
            assert Path(second, "converted").is_file()
        assert not os.path.exists(second)
        assert Path(first, "converted").is_file()  # the other run's clean-up left this one's folder alone
    assert not os.path.exists(first)


def test_a_failed_conversion_raises_and_leaves_no_folder(process_group, monkeypatch):
    from llm_ray.train import worker

    made = []

    def broken(ds_dir, tag, out_dir):
        made.append(out_dir)
        raise OSError("disk full")

    monkeypatch.setattr(worker, "to_universal", broken)
    with pytest.raises(RuntimeError, match="universal checkpoint failed: node 0: OSError: disk full"):
        with worker.universal_checkpoint("unused", FakeContext(0, 0)):
            pass
    assert made and not os.path.exists(made[0])


@pytest.mark.slow
def test_each_node_converts_once_into_its_own_folder_shared_by_its_workers(tmp_path):
    """Three workers: two on node 0, one on node 1. Each node's local rank 0 converts; its workers
    load its folder (the other node's is on another disk); every folder is gone afterwards."""
    import torch.multiprocessing as mp

    from tests._race_workers import universal_folders

    nodes = [0, 0, 1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(universal_folders, args=(nodes, str(tmp_path / "store"), queue), nprocs=len(nodes))
    seen = {rank: (folder, writer, exists) for rank, folder, writer, exists in (queue.get() for _ in nodes)}
    assert seen[0][:2] == seen[1][:2]  # rank 1 loads what its node's rank 0 converted
    assert seen[2][0] != seen[0][0]
    assert not any(exists for _, _, exists in seen.values())


def fake_checkpoints(root: Path, count: int) -> list:
    """count checkpoint folders whose model/ files say which checkpoint they belong to; each has a file
    the others lack (a published model/ must not keep an older checkpoint's files)."""
    from llm_ray.checkpoint import MODEL_DIR, WEIGHTS
    from llm_ray.storage import Location

    checkpoints = []
    for i in range(count):
        folder = root / f"checkpoint_{i:06d}" / MODEL_DIR
        folder.mkdir(parents=True)
        for name in ("config.yaml", "tokenizer.json", "train_state.json", "generation.json", f"only-in-{i}"):
            (folder / name).write_text(f"{name} of checkpoint {i}")
        (folder / WEIGHTS).write_bytes(f"weights of checkpoint {i}".encode())
        checkpoints.append(Location(str(folder.parent)))
    return checkpoints


# A reader in a process of its own, as a server would be: looks for the weights until told to stop,
# then prints how many looks it made and how many found them missing.
READER = """
import os, sys
weights, ready, stop = sys.argv[1:]
looks = misses = 0
open(ready, "w").close()
while not os.path.exists(stop):
    looks += 1
    misses += not os.path.isfile(weights)
print(looks, misses)
"""


def test_a_reader_never_finds_model_missing_while_checkpoints_are_published(tmp_path, corpus_dir):
    """A server started on the run folder polls model/ while publish_model replaces it again and again:
    the weights are always there, and each publish leaves exactly the new checkpoint's files."""
    import subprocess
    import sys
    import time

    from llm_ray.checkpoint import MODEL_DIR, WEIGHTS
    from llm_ray.train.trainer import publish_model
    from tests.conftest import debug_config

    cfg = debug_config(tmp_path / "runs", corpus_dir)
    checkpoints = fake_checkpoints(tmp_path / "checkpoints", 2)
    model = cfg.run_dir / MODEL_DIR
    publish_model(cfg, checkpoints[0], log=lambda *_: None)  # the first: nothing there yet
    ready, stop = tmp_path / "reader-ready", tmp_path / "reader-stop"
    reader = subprocess.Popen([sys.executable, "-S", "-c", READER, str(model / WEIGHTS), str(ready), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        while not ready.exists():
            time.sleep(0.01)
        for i in range(1, 40):
            publish_model(cfg, checkpoints[i % 2], log=lambda *_: None)
            assert (model / WEIGHTS).read_bytes() == f"weights of checkpoint {i % 2}".encode()
            assert (model / f"only-in-{i % 2}").is_file() and not (model / f"only-in-{1 - i % 2}").exists()
    finally:
        stop.touch()
        looks, misses = map(int, reader.communicate(timeout=30)[0].split())
    assert looks > 1000 and misses == 0, f"model/ was missing at {misses} of {looks} looks"
    assert [p.name for p in model.parent.iterdir() if p.name.startswith(f".{MODEL_DIR}")] == []  # nothing left


def test_without_an_atomic_swap_the_old_folder_is_renamed_aside(tmp_path, monkeypatch):
    """The fallback (no renameat2 exchange: macOS, old kernels, some network filesystems) still leaves
    exactly the new folder and nothing beside it."""
    from llm_ray import storage

    monkeypatch.setattr(storage.local, "exchange_paths", lambda a, b: False)
    target = tmp_path / "model"
    for i in range(3):
        new = tmp_path / f".incoming-{i}"
        new.mkdir()
        (new / "weights").write_text(str(i))
        storage.replace_folder(new, target)
        assert (target / "weights").read_text() == str(i)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_the_atomic_swap_exchanges_two_folders(tmp_path):
    from llm_ray.storage import exchange_paths

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    # Linux (this project's nodes) has renameat2 on local filesystems; the fallback is tested above.
    assert exchange_paths(tmp_path / "a", tmp_path / "b")
    assert not (tmp_path / "a" / "x").exists() and (tmp_path / "b" / "x").read_text() == "a"


# ---------------------------------------------------------------- a sweep's state in object storage


@pytest.fixture
def bucket(s3_server):
    """An empty bucket on the moto server, and the S3 settings that reach it."""
    import secrets

    from llm_ray.storage import S3Settings

    endpoint, client = s3_server
    name = f"races-{secrets.token_hex(6)}"
    client.create_bucket(Bucket=name)
    return f"s3://{name}", S3Settings(endpoint_url=endpoint), client


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_new_creates_once(where, tmp_path, request):
    from llm_ray.storage import Location

    if where == "s3":
        root, s3, _ = request.getfixturevalue("bucket")
        target = Location.parse(f"{root}/claims/claim-0.json", s3)
    else:
        target = Location.parse(tmp_path / "claims" / "claim-0.json")
    assert target.write_new(b"first") is True
    assert target.write_new(b"second") is False
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["claim-0.json"]  # no temporary left beside it


def test_one_of_two_concurrent_trials_prepares_a_variant_on_s3(bucket, monkeypatch):
    """Two threads (trials on two nodes) need the same data variant at once: exactly one runs the work,
    the other waits for its marker and reuses it."""
    import threading
    import time

    from llm_ray.storage import Location
    from llm_ray.sweep import claim

    root, s3, _ = bucket
    monkeypatch.setattr(claim, "POLL_S", 0.05)
    folder = Location.parse(f"{root}/sweep/data/k", s3)
    done = folder / "data" / "manifest.json"
    ran, results, start = [], {}, threading.Barrier(2)

    def work(owner):
        ran.append(owner)
        time.sleep(0.5)
        done.write_json({"by": owner})

    def trial(owner):
        start.wait()
        results[owner] = claim.run_once(folder, done, owner, lambda: work(owner), log=lambda *_: None)

    threads = [threading.Thread(target=trial, args=(f"trial-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ran) == 1 and results == {ran[0]: True, next(o for o in results if o != ran[0]): False}
    assert done.read_json() == {"by": ran[0]}
    assert claim.newest_claim(folder)[1]["released"]


def test_a_dead_holders_claim_is_taken_over_after_it_goes_stale(tmp_path):
    """A trial killed while preparing leaves its claim behind, unchanged: a waiter takes the next claim
    once it saw no heartbeat for STALE_S seconds (its own clock), and only then."""
    from llm_ray.storage import Location
    from llm_ray.sweep import claim

    folder = Location.parse(tmp_path / "data" / "k")
    done = folder / "done"
    (folder / "claim-0.json").write_json({"owner": "trial-dead", "token": "x", "beat": 7})
    now, ran = [0.0], []
    outcome = claim.run_once(folder, done, "trial-b", lambda: (ran.append(now[0]), done.write_text("ok")),
                             log=lambda *_: None, clock=lambda: now[0],
                             sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert outcome is True and ran and ran[0] >= claim.STALE_S
    assert claim.newest_claim(folder)[0] == 1  # a new claim; the dead one's is left as it was
    # A restored trial takes its own earlier claim over at once; a failed one releases its claim.
    (folder / "claim-2.json").write_json({"owner": "trial-c", "token": "y", "beat": 0})
    (tmp_path / "data" / "k" / "done").unlink()
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        claim.run_once(folder, done, "trial-c", lambda: (_ for _ in ()).throw(RuntimeError("tokenizer failed")),
                       log=lambda *_: None, sleep=lambda s: pytest.fail("waited for its own claim"))
    n, record = claim.newest_claim(folder)
    assert n == 3 and record["owner"] == "trial-c" and record["released"]
    assert claim.run_once(folder, done, "trial-d", lambda: done.write_text("ok"), log=lambda *_: None,
                          sleep=lambda s: pytest.fail("waited for a released claim")) is True


def test_trial_status_and_data_claims_live_in_the_sweep_folder_on_s3(bucket, monkeypatch, corpus_dir):
    """A sweep folder on S3: a trial's status is written there and read back (by any node), and the
    data variant a trial prepares is prepared under its claim there, then reused."""
    import yaml

    from llm_ray.config import load_config
    from llm_ray.storage import Location
    from llm_ray.sweep import trial
    from llm_ray.sweep.memory import GIB

    root, s3, client = bucket
    base = load_config("debug", [f"output_dir={root}/runs", f"data.sources=[{corpus_dir}]",
                                 f"data.s3.endpoint_url={s3.endpoint_url}"])
    sweep = Location.parse(f"{root}/sweeps/s", s3)
    plan = {"base_tree": base.model_dump(mode="json"), "sweep": "s", "sweep_dir": sweep.uri, "s3": s3,
            "trials_dir": (sweep / "trials").uri, "concurrent_trials": 1, "memory": {"per_worker": 4 * GIB},
            "base_data": {"variant": trial.data_variant(base), "path": "unused", "output_dir": base.output_dir,
                          "name": base.name}}
    with pytest.raises(trial.InvalidTrial):
        trial.check_trial(plan, {"model.n_embd": 63}, "t_00000")
    key = "sweeps/s/trials/trial-t_00000/trial.json"
    stored = yaml.safe_load(client.get_object(Bucket=root[len("s3://"):], Key=key)["Body"].read())
    assert stored["status"] == "invalid" and trial.read_status(sweep / "trials" / "trial-t_00000") == stored
    assert trial.read_status(sweep / "trials" / "trial-none") is None

    prepared = []

    def fake_prepare(cfg, log=print):
        prepared.append(cfg.run_location.uri)
        (cfg.run_location / "data" / "manifest.json").write_json({"fake": True})

    monkeypatch.setattr(trial, "prepare", fake_prepare)
    cfg, _ = trial.check_trial(plan, {"tokenizer.vocab_size": 384}, "t_00001")
    first = trial.trial_data(plan, cfg, log=lambda *_: None)
    again = trial.trial_data(plan, trial.check_trial(plan, {"tokenizer.vocab_size": 384}, "t_00002")[0],
                             log=lambda *_: None)
    assert first[1] == "prepared" and again == (first[0], "reused") and len(prepared) == 1
    assert first[0].uri.startswith(f"{sweep.uri}/data/") and first[0].remote
    claims = [p.name for p in first[0].parent.iterdir() if p.name.startswith("claim-")]
    assert claims == ["claim-0.json"]


def test_the_results_of_a_sweep_on_s3_are_written_there(bucket):
    import yaml

    from llm_ray.config import load_config
    from llm_ray.config.sweep import SweepConfig
    from llm_ray.storage import Location
    from llm_ray.sweep.results import write_results

    root, s3, _ = bucket
    sweep = SweepConfig.model_validate({"name": "s", "space": {"train.lr": "choice([0.001, 0.01])"}})
    base = load_config("debug", [f"output_dir={root}/runs", f"data.s3.endpoint_url={s3.endpoint_url}"])
    row = {"trial": "trial-a", "status": "finished", "train.lr": 0.01, "val_loss": 5.0, "step": 8, "reason": "",
           "checkpoint": f"{root}/sweeps/s/trials/trial-a/model"}
    summary = {"rows": [row], "best": row, "objective": "val_loss"}
    folder = Location.parse(f"{root}/sweeps/s", s3)
    write_results(summary, sweep, base, folder, log=lambda *_: None)
    assert folder.files() == ["best_config.yaml", "history.png", "parallel.png", "results.csv"]
    assert summary["best_config"] == f"{folder.uri}/best_config.yaml"
    assert yaml.safe_load((folder / "best_config.yaml").read_text())["train"]["lr"] == 0.01


def test_a_sweep_folder_on_a_cluster_is_shared_or_on_s3(bucket, monkeypatch, tmp_path):
    """Trials on other nodes write their status and data into the sweep folder: a local one on several
    nodes is refused unless data.shared_filesystem says every node mounts it; S3 must be writable."""
    from llm_ray.config import ConfigError, load_config
    from llm_ray.config.sweep import SweepConfig
    from llm_ray.sweep import runner

    root, s3, _ = bucket
    monkeypatch.setattr(runner, "alive_nodes", lambda: 2)
    sweep = SweepConfig.model_validate({"name": "s", "space": {"train.lr": "choice([0.001, 0.01])"}})
    local = load_config("debug", [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"2 nodes, but output_dir of the base config \(debug\) .* is a local path"):
        runner.check_sweep_storage(runner.sweep_dir(sweep, local), sweep, local)
    shared = load_config("debug", [f"output_dir={tmp_path}", "data.shared_filesystem=true"])
    runner.check_sweep_storage(runner.sweep_dir(sweep, shared), sweep, shared)
    remote = load_config("debug", [f"output_dir={root}/runs", f"data.s3.endpoint_url={s3.endpoint_url}"])
    runner.check_sweep_storage(runner.sweep_dir(sweep, remote), sweep, remote)
    missing = load_config("debug", ["output_dir=s3://no-such-bucket/runs", f"data.s3.endpoint_url={s3.endpoint_url}"])
    with pytest.raises(ConfigError, match="no-such-bucket/runs/s: the bucket does not exist"):
        runner.check_sweep_storage(runner.sweep_dir(sweep, missing), sweep, missing)
