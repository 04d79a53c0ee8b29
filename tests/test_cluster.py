"""Clusters for real: a Ray head started with `ray start` on 127.0.0.1 and jobs sent with `ray job
submit`; a simulated two-node cluster (ray.cluster_utils) with the run on S3. (What a local Ray
started by llm-ray listens on: tests/test_processes.py.) Every Ray here is its own set of processes, not the tests' shared
Ray: these tests stop only the processes they started (never `ray stop`, which stops every Ray
on the machine)."""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from llm_ray.ray_utils import SINGLE_MACHINE_ENV

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LLM_RAY, RAY = str(BIN / "llm-ray"), str(BIN / "ray")
RAY_SETTINGS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
DEBUG = ["--config", "debug", "--set", "data.max_files=null", "--set", "train.eval_every=10",
         "--set", "train.checkpoint_every=10"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """This environment without the tests' Ray settings, the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in (*RAY_SETTINGS, SINGLE_MACHINE_ENV)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


# ------------------------------------------------------------------ a head started with `ray start`


@dataclass
class Head:
    address: str  # the dashboard (Jobs API) URL
    temp_dir: str
    token: str  # what `ray get-auth-token` would print on the head


def token_env(token: str) -> dict:
    """Ray's token authentication on, with this token (a client or node would have it in ~/.ray/auth_token
    or RAY_AUTH_TOKEN_PATH; the tests keep theirs out of the home folder)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def stop_processes_of(marker: str) -> None:
    """SIGKILL every process whose command line holds marker, and their descendants."""
    doomed = {}
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or []):
            doomed[proc.pid] = proc
            try:
                doomed.update((c.pid, c) for c in proc.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    for proc in doomed.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(doomed.values()), timeout=20)


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on 127.0.0.1 from the venv (so a job's `python` is the venv's), in single-machine
    mode (without it Ray swaps 127.0.0.1 for the machine's routable address), ports of its own, and token
    authentication on (`ray start` turns it on only when asked or when a token already exists)."""
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="llmray-head-", dir="/tmp")  # short: Ray's socket paths must fit
    dashboard = free_port()
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--port={free_port()}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}"]
    started = subprocess.run(cmd, env=clean_env(**{SINGLE_MACHINE_ENV: "0"}, **token_env(token)), capture_output=True,
                             text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield Head(f"http://127.0.0.1:{dashboard}", temp_dir, token)
    finally:
        stop_processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head: Head, entry: list[str], token: bool = True, wait: bool = True, timeout: int = 600,
           env_vars: dict | None = None):
    runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
    cmd = [RAY, "job", "submit", "--address", head.address, "--working-dir", str(ROOT), *runtime_env,
           *([] if wait else ["--no-wait"]), "--", "python", *entry]
    env = clean_env(**(token_env(head.token) if token else {}))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def job_status(head: Head, job_id: str) -> str:
    done = subprocess.run([RAY, "job", "status", "--address", head.address, job_id], capture_output=True, text=True,
                          env=clean_env(**token_env(head.token)), timeout=60)
    return done.stdout + done.stderr


def newest_step(checkpoints: Path) -> int:
    """The step of the newest complete checkpoint: every worker wrote its manifest (a worker writes it last)."""
    steps = []
    for state in checkpoints.glob("checkpoint_*/model/train_state.json"):
        manifests = sorted((state.parents[1] / "_manifest").glob("rank-*.json"))
        if manifests and len(manifests) == json.loads(manifests[0].read_text())["world_size"]:
            steps.append(json.loads(state.read_text())["step"])
    return max(steps, default=0)


def job_logs(head: Head, job_id: str) -> str:
    done = subprocess.run([RAY, "job", "logs", "--address", head.address, job_id], capture_output=True, text=True,
                          env=clean_env(**token_env(head.token)), timeout=60)
    return (done.stdout + done.stderr)[-4000:]


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def app_answers(port: int) -> bool:
    """True while llm-ray's API answers on the port (Serve's proxy may stay, answering 404)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            return r.status == 200
    except OSError:  # refused, or an HTTP error status
        return False


def test_ray_job_submit_path_end_to_end_with_a_killed_driver_resubmitted_and_serving(ray_head, tmp_path):
    out = tmp_path / "runs"
    entry = ["jobs/pipeline.py", *DEBUG, "--set", f"output_dir={out}", "--set", "data.sources=[tests/data/corpus]",
             "--set", "train.max_steps=60"]
    # README's line without RAY_AUTH_MODE=token: the head's token authentication refuses it
    refused = submit(ray_head, entry, token=False, timeout=120)
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower()
    print("without RAY_AUTH_MODE=token:", (refused.stdout + refused.stderr)[-600:])

    first = submit(ray_head, entry, wait=False, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", first.stdout).group(0)
    checkpoints = out / "debug" / "checkpoints" / "debug"
    deadline = time.time() + 400
    while newest_step(checkpoints) < 10:
        assert time.time() < deadline, job_status(ray_head, job_id)
        time.sleep(1)
    drivers = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"].startswith("python")
               and "jobs/pipeline.py" in " ".join(p.info["cmdline"] or []) and str(out) in " ".join(p.info["cmdline"])]
    assert len(drivers) == 1  # (Ray starts it through a shell, which stays)
    drivers[0].send_signal(signal.SIGKILL)  # the driver dies mid-training
    deadline = time.time() + 120
    while "failed" not in (status := job_status(ray_head, job_id)).lower():
        assert time.time() < deadline, status
        time.sleep(1)
    # The job's workers outlive its driver by a moment and may finish one more checkpoint meanwhile.
    while any(p.info["name"] == "ray::RayTrainWorker" for p in psutil.process_iter(["name"])):
        assert time.time() < deadline, "the killed job's training workers are still running"
        time.sleep(1)
    killed_at = newest_step(checkpoints)
    assert 10 <= killed_at < 60

    again = submit(ray_head, entry)  # follows the job's logs until it ends
    logs = again.stdout + again.stderr
    assert again.returncode == 0, logs[-4000:]
    assert "preflight: all checks passed" in logs
    assert "pack: up to date, skipped" in logs  # prepare's stages were complete
    assert f"train: resuming from step {killed_at}" in logs
    state = json.loads(max(checkpoints.glob("checkpoint_*/model/train_state.json"),
                           key=lambda p: json.loads(p.read_text())["step"]).read_text())
    assert state["step"] == 60 and state["resumed_from"] == [killed_at]
    assert (out / "debug" / "eval" / "eval.json").is_file() and (out / "debug" / "loss_curve.png").is_file()

    # serve the run's best checkpoint as a job (README's line), ask it, stop the job: the app goes with it
    port = free_port()
    served = submit(ray_head, ["jobs/serve.py", "--run", "debug", "--output-dir", str(out), "--set", f"port={port}"],
                    wait=False, timeout=120)
    serve_id = re.search(r"raysubmit_[A-Za-z0-9]+", served.stdout).group(0)
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
                models = json.loads(r.read())
            break
        except OSError:
            assert time.time() < deadline, job_logs(ray_head, serve_id)
            time.sleep(1)
    assert models["data"], models
    stopped = subprocess.run([RAY, "job", "stop", "--address", ray_head.address, serve_id], capture_output=True,
                             text=True, env=clean_env(**token_env(ray_head.token)), timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    deadline = time.time() + 60
    while app_answers(port) or port_taken(port):  # Serve goes too (no other app): the port is free for the next
        assert time.time() < deadline, "the Serve app outlived its job"
        time.sleep(1)


def test_ray_job_stop_checkpoints_the_step_reached(ray_head, tmp_path):
    """`ray job stop` sends the job's driver SIGTERM: the workers checkpoint the step they reached and the
    job's log says which and how to resume. The job's runtime_env gives Ray's stop more than its default 3 s
    before SIGKILL (RAY_JOB_STOP_WAIT_TIME_S), as docs/clusters.md says."""
    out = tmp_path / "runs"
    entry = ["jobs/pipeline.py", *DEBUG, "--set", f"output_dir={out}", "--set", "data.sources=[tests/data/corpus]",
             "--set", "train.max_steps=100000", "--set", "train.checkpoint_every=100000"]
    started = submit(ray_head, entry, wait=False, timeout=120, env_vars={"RAY_JOB_STOP_WAIT_TIME_S": "60"})
    assert started.returncode == 0, started.stdout + started.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", started.stdout).group(0)
    deadline = time.time() + 400
    while not re.search(r"step +\d\d+/100000", job_logs(ray_head, job_id)):
        assert time.time() < deadline, job_status(ray_head, job_id)
        time.sleep(2)
    stopped = subprocess.run([RAY, "job", "stop", "--address", ray_head.address, job_id], capture_output=True,
                             text=True, env=clean_env(**token_env(ray_head.token)), timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    deadline = time.time() + 120
    while not re.search(r"stopped by SIGTERM after step \d+", logs := job_logs(ray_head, job_id)):
        assert time.time() < deadline, logs
        time.sleep(2)
    step = int(re.search(r"stopped by SIGTERM after step (\d+); its checkpoint is complete", logs)[1])
    checkpoints = out / "debug" / "checkpoints" / "debug"
    assert newest_step(checkpoints) == step  # complete: every worker's manifest is there
    state = json.loads(next(checkpoints.glob("checkpoint_*/model/train_state.json")).read_text())
    assert state["step"] == step and state["stopped_at"] == [step]


# ------------------------------------------------------------------ a simulated two-node cluster


@dataclass
class SimulatedCluster:
    """tests/_simulated_cluster.py running: its environment for llm-ray commands, the S3 bucket two-nodes
    holding the corpus, prepared by `llm-ray prepare` on the cluster under s3://two-nodes/runs/debug."""

    process: subprocess.Popen
    env: dict
    s3: list[str]
    client: object

    def command(self, line: str) -> list[str]:
        """remove, add, or list: the ids of the nodes with CPUs afterwards."""
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def run(self, *args, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([LLM_RAY, *args], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def simulated_cluster(s3_server, tmp_path_factory):
    from tests.conftest import CORPUS as corpus_dir

    endpoint, client = s3_server
    client.create_bucket(Bucket="two-nodes")
    for f in sorted(corpus_dir.iterdir()):
        client.put_object(Bucket="two-nodes", Key=f"corpus/{f.name}", Body=f.read_bytes())
    auth = token_env(secrets.token_hex(32))
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_simulated_cluster.py"), str(free_port())],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=clean_env(**auth), cwd=ROOT)
    try:
        info = json.loads(process.stdout.readline())
        # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S: Ray Train's view of the nodes lags by up to 20 s, so after a
        # node is lost it may first try the old size; it gives up on that after this (default 60 s).
        cluster = SimulatedCluster(process, clean_env(RAY_ADDRESS=info["address"], RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10",
                                                      **auth), ["--set", f"data.s3.endpoint_url={endpoint}"], client)
        prepared = cluster.run("prepare", *DEBUG, *cluster.s3, "--set", "output_dir=s3://two-nodes/runs",
                               "--set", "data.sources=[s3://two-nodes/corpus/]", cwd=tmp_path_factory.mktemp("prepare"))
        assert prepared.returncode == 0, (prepared.stdout + prepared.stderr)[-4000:]
        yield cluster
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for proc in [*psutil.Process(process.pid).children(recursive=True), process]:
                proc.kill()


def test_two_node_cluster_spreads_the_workers_and_keeps_the_run_on_s3(simulated_cluster, tmp_path):
    from llm_ray.checkpoint import read_train_state

    cluster, s3 = simulated_cluster, simulated_cluster.s3
    local = cluster.run("prepare", *DEBUG, *s3, "--set", f"output_dir={tmp_path}",
                        "--set", "data.sources=[s3://two-nodes/corpus/]", cwd=tmp_path)
    assert local.returncode == 2 and "nodes" in local.stderr and "output_dir" in local.stderr

    spread = cluster.run("pipeline", *DEBUG, *s3, "--set", "output_dir=s3://two-nodes/runs", "--set", "train.max_steps=20",
                         "--set", "data.sources=[s3://two-nodes/corpus/]", "--set", "train.placement_strategy=SPREAD",
                         cwd=tmp_path)
    assert spread.returncode == 0, (spread.stdout + spread.stderr)[-4000:]
    state = read_train_state(model_folder(spread.stdout))
    assert sorted(state["worker_nodes"]) == sorted(cluster.command("list"))  # one worker on each node
    assert cluster.client.list_objects_v2(Bucket="two-nodes", Prefix="runs/debug/model/")["KeyCount"] >= 3
    assert not (tmp_path / "runs").exists()

    packed = cluster.run("train", *DEBUG, *s3, "--set", "output_dir=s3://two-nodes/runs", "--set", "name=packed",
                         "--set", "train.max_steps=4", "--set", "train.placement_strategy=PACK",
                         "--data", "s3://two-nodes/runs/debug/data", cwd=tmp_path)
    assert packed.returncode == 0, (packed.stdout + packed.stderr)[-4000:]
    assert len(set(read_train_state(model_folder(packed.stdout))["worker_nodes"])) == 1


def test_elastic_training_goes_on_with_fewer_workers_and_grows_back(simulated_cluster, tmp_path):
    """train.num_workers [1, 2] with one 1-CPU worker per node: a node is lost after step 100 and the run goes
    on with 1 worker from its newest checkpoint; a node is added and it returns to 2; it finishes, with every
    change and its step in train_state.json, and the same global batch throughout (checkpoints on S3)."""
    from llm_ray.checkpoint import read_train_state

    cluster = simulated_cluster
    log = tmp_path / "train.log"
    with log.open("w") as out:
        train = subprocess.Popen(
            [LLM_RAY, "train", *DEBUG, *cluster.s3, "--set", "output_dir=s3://two-nodes/runs", "--set", "name=elastic",
             "--data", "s3://two-nodes/runs/debug/data", "--set", "train.num_workers=[1, 2]",
             "--set", "train.cpus_per_worker=1", "--set", "train.placement_strategy=SPREAD",
             "--set", "train.max_failures=3", "--set", "train.elastic_resize_interval_s=5",
             "--set", "train.max_steps=500", "--set", "train.checkpoint_every=20", "--set", "train.log_every=20",
             "--set", "train.eval_every=500"], env=cluster.env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        def wait_for(pattern: str, seconds: float) -> None:
            deadline = time.time() + seconds
            while not re.search(pattern, log.read_text()):
                assert train.poll() is None, log.read_text()[-4000:]
                assert time.time() < deadline, f"no {pattern!r} in {seconds} s:\n{log.read_text()[-4000:]}"
                time.sleep(0.5)

        wait_for(r"step +100/500", 300)
        assert len(cluster.command("remove")) == 1
        wait_for(r"training goes on with 1 workers", 120)
        assert len(cluster.command("add")) == 2
        wait_for(r"training goes on with 2 workers", 120)
        assert train.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if train.poll() is None:
            train.kill()
    printed = log.read_text()
    state = read_train_state(model_folder(printed))
    print(f"elastic run: worker counts [step, workers] {state['world_sizes']}, restarts from {state['resumed_from']}")
    [start, shrunk, grown] = state["world_sizes"]
    assert start == [0, 2] and shrunk[1] == 1 and grown[1] == 2, state["world_sizes"]
    assert 0 < shrunk[0] < grown[0] < 500 and state["resumed_from"] == [shrunk[0], grown[0]]
    assert shrunk[0] % 20 == 0 and grown[0] % 20 == 0  # each from a checkpoint
    assert state["step"] == 500
    # The loss curve has every logged step once; the data stream advanced by the same global batch throughout.
    assert [h["step"] for h in state["history"] if "train_loss" in h] == list(range(20, 501, 20))
    assert state["samples"] == 500 * 1024 // 64  # debug: total_batch_tokens 1024, block_size 64


def model_folder(stdout: str) -> str:
    """The local copy of the final model a run on S3 prints ("... local copy <dir>)" or "copied to <dir>")."""
    for line in stdout.splitlines():
        for marker in ("local copy ", "copied to "):
            if line.startswith("train: checkpoint") and marker in line:
                return line.split(marker, 1)[1].rstrip(")")
    raise AssertionError(f"no model folder in the output:\n{stdout[-3000:]}")
