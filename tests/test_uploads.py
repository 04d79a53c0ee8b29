"""Checkpoints on S3 uploaded in the background (train.checkpoint_upload, see train.upload), on the moto
server behind a proxy that makes uploads slow or fail: training no longer waits for the upload, each
worker's manifest is the last object it uploads, a failed upload is reported and training goes on, and a
run killed mid-upload resumes from the checkpoint before."""

import json
import os
import re
import signal
from collections import Counter

import pytest

from llm_ray.checkpoint import read_train_state
from llm_ray.data.prepare import data_dir, prepare
from llm_ray.train.trainer import train
from tests._s3_proxy import S3Proxy
from tests.conftest import CORPUS, debug_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    cfg = debug_config(tmp_path_factory.mktemp("uploads"), CORPUS)
    prepare(cfg, log=lambda *_: None)
    return cfg


@pytest.fixture
def bucket(s3_server):
    endpoint, client = s3_server
    name = f"ckpt-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=name)
    return endpoint, client, name


def on_s3(cfg, proxy: S3Proxy, bucket: str, name: str, *settings: tuple[str, object]):
    run = cfg.model_copy(update={"name": name}, deep=True)
    run.train.storage_path = f"s3://{bucket}/runs"
    run.data.s3.endpoint_url = proxy.endpoint
    for field, value in settings:
        setattr(run.train, field, value)
    return run


def checkpoint_stall(state: dict) -> float:
    """Seconds the workers spent in checkpoints (waiting for uploads included), from the run's logged rows."""
    return sum(h["checkpoint_seconds"] for h in state["history"] if "checkpoint_seconds" in h)


def test_training_goes_on_while_a_checkpoint_uploads_and_the_manifest_goes_last(prepared, bucket):
    """Every write request to S3 takes 0.05 s longer (a slow link): a synchronous checkpoint waits for its
    uploads (about 35 requests), a background one only for its local write, as long as the upload is done
    before the next checkpoint. Same run otherwise (3 checkpoints, 2 workers, ZeRO-2)."""
    endpoint, client, name = bucket
    proxy = S3Proxy(endpoint, write_delay_s=0.05)
    try:
        stalls = {}
        for mode in ("sync", "async"):
            run = on_s3(prepared, proxy, name, mode, ("checkpoint_upload", mode), ("max_steps", 360),
                        ("checkpoint_every", 120), ("log_every", 40), ("eval_every", 360), ("num_checkpoints_to_keep", 4))
            first = len(proxy.writes)
            result = train(run, data_dir(prepared), log=lambda *_: None)
            stalls[mode] = checkpoint_stall(read_train_state(result.checkpoint))
            writes = [key for _, key in proxy.writes[first:]  # files: pyarrow also writes folder markers (key/)
                      if f"/runs/{mode}/checkpoint_" in key and not key.endswith("/")]
            # Each worker's manifest is the last object of its part of each checkpoint.
            for key in {k for k in writes if "/_manifest/rank-" in k}:
                folder, rank = key.split("/_manifest/")[0], int(re.search(r"rank-(\d+)", key)[1])
                manifest = client.get_object(Bucket=name, Key=key.split(f"/{name}/", 1)[1])["Body"].read()
                listed = {f"{folder}/{f}" for f in json.loads(manifest)["files"]}
                assert listed and listed <= set(writes[:writes.index(key)]), (mode, rank, listed - set(writes))
            # 3 checkpoints x 2 workers (pyarrow uploads each file in a multipart upload: 3 writes of its key)
            assert len({k for k in writes if "/_manifest/rank-" in k}) == 3 * 2
        print(f"checkpoint stall over the 2 checkpoints before the last: sync {stalls['sync']:.2f} s, async {stalls['async']:.2f} s")
        assert stalls["async"] < stalls["sync"] / 3, stalls
    finally:
        proxy.close()


def test_a_failed_upload_is_reported_and_a_run_killed_mid_upload_resumes_before_it(prepared, bucket, capsys):
    """Checkpoints at steps 10, 20, 30, 40. Every write of worker 1's optimizer shard at step 20 fails: the
    worker retries, says so, and training goes on. The workers are killed once two files of the step-40
    checkpoint are up. The rerun skips that one and resumes from step 30 (the one at step 20 is older)."""
    import ray
    from ray.train import WorkerGroupError
    from ray.util.state import list_actors

    endpoint, client, name = bucket
    folders: list[str] = []  # checkpoint folders in the order their first write came
    killed = []

    requests = Counter()

    def note(key):
        folder = re.search(r"/(checkpoint_[^/]+)/", key)
        if folder and folder[1] not in folders:
            folders.append(folder[1])
        if folder and len(folders) == 4:
            requests[folder[1]] += 1
            if requests[folder[1]] == 7:  # two files of the step-40 checkpoint are up: kill every worker
                gcs = ray.get_runtime_context().gcs_address
                for actor in list_actors(address=gcs, filters=[("class_name", "=", "RayTrainWorker"),
                                                               ("state", "=", "ALIVE")]):
                    os.kill(actor.pid, signal.SIGKILL)
                    killed.append(actor.pid)

    def failing(key):
        return len(folders) == 2 and f"/{folders[1]}/" in key and "rank_1_" in key and "optim_states" in key

    proxy = S3Proxy(endpoint, fail_write=failing, on_write=note)
    try:
        run = on_s3(prepared, proxy, name, "killed", ("max_steps", 50), ("checkpoint_every", 10), ("log_every", 10),
                    ("eval_every", 50), ("num_checkpoints_to_keep", 4))
        run.data.s3.max_attempts = 1  # the SDK's retries aside: the worker's own attempts are what is tested
        with pytest.raises(WorkerGroupError):
            train(run, data_dir(prepared), log=lambda *_: None)
        assert killed and proxy.failed_writes == 3  # the worker's 3 attempts
        printed = capsys.readouterr()
        assert re.search(rf"checkpoint upload failed on worker 1 after 3 attempts: .*{folders[1]}.*training goes on",
                         printed.out + printed.err)
        lines = []
        state = read_train_state(train(run, data_dir(prepared), log=lines.append).checkpoint)
    finally:
        proxy.close()
    skipped = [line for line in lines if "skipping the damaged checkpoint" in line]
    assert len(skipped) == 1 and folders[3] in skipped[0], lines  # the newest; the one at step 20 is older than 30
    assert any("resuming from step 30 " in line and folders[2] in line for line in lines), lines
    assert state["step"] == 50 and state["resumed_from"] == [30]
