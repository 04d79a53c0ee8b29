"""No process outlives a command: the Ray that `llm-ray` starts (GCS, raylet, dashboard and its modules,
agents, workers) and its watchdog are gone once the command ends normally, on SIGTERM, or after its driver
is SIGKILLed mid-training. Each command gets a Ray temp folder of its own (RAY_TMPDIR), by which its
processes are told from any other Ray on the machine. While it runs, every socket its processes listen on
is on loopback. And Ray's known-harmless error line stays out of what a run prints, while other lines
workers write still show."""

import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from llm_ray.ray_utils import SINGLE_MACHINE_ENV
from tests.conftest import CORPUS

BIN = Path(sys.executable).parent
LLM_RAY = str(BIN / "llm-ray")
RAY_SETTINGS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")
# Gone with the command: Ray's own clean-up takes a second or two. Without the fixes its agents stayed a
# minute after a SIGTERM or a SIGKILL (they report the raylet's death to the dead GCS and wait 60 s).
GONE_WITHIN_S = 20
HARMLESS = ("[2026-12-02 16:15:04,964 E 10269 10315] core_worker.cc:2465: Actor with class name: "
            "'PreemptionWatcher' and ID: '824839c972da2cf30927150901000000' has constructor arguments in the "
            "object store and max_restarts > 0. If the arguments in the object store go out of scope or are "
            "lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def listening_sockets(root: psutil.Process) -> dict[tuple[str, int], str]:
    """(address, port) -> process name of every listening socket of root and its descendants."""
    found = {}
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in processes:
        try:
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found[(c.laddr.ip, c.laddr.port)] = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def processes_of(temp_dir: str, driver: int) -> dict[int, str]:
    """pid -> title of each process of the Ray whose temp folder is temp_dir, and of the watchdog of the
    driver: Ray's command lines name the folder (GCS, raylet, dashboard, monitors), or the process holds
    a log file open there (workers and agents, whose titles Ray rewrites, e.g. ray::IDLE)."""
    found = {}
    for p in psutil.process_iter(["name", "cmdline"]):
        cmdline = p.info["cmdline"] or [p.info["name"] or "?"]  # empty while it exits: its files close later
        line = " ".join(cmdline)
        try:
            if temp_dir in line or any(f.path.startswith(temp_dir) for f in p.open_files()) or (
                    "ray_utils.py" in line and cmdline[-1] == str(driver)):
                found[p.pid] = cmdline[0].rsplit("/", 1)[-1][:40]
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # exited meanwhile (a zombie too)
            pass
    return found


@dataclass
class Command:
    """An `llm-ray` command run with a Ray temp folder of its own, its Ray's processes sampled."""

    args: list[str]
    log: Path
    # short, as Ray's socket paths in it must fit in 107 bytes
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="llmray-", dir="/tmp"))
    before: int = 0  # its processes before it started (a check that the temp folder is its own)
    seen: set[str] = field(default_factory=set)  # every title sampled while it ran
    most: int = 0  # the most processes sampled at once
    # every listening socket of the command and its descendants -> the processes seen on it (Ray reuses ports)
    sockets: dict[tuple[str, int], set[str]] = field(default_factory=dict)

    def start(self) -> "Command":
        # the command sets Ray's single-machine mode itself: none inherited from the tests' own Ray
        env = {k: v for k, v in os.environ.items() if k not in (*RAY_SETTINGS, SINGLE_MACHINE_ENV)}
        env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_TMPDIR=self.temp_dir)
        self.before = len(processes_of(self.temp_dir, -1))
        self.out = self.log.open("w")
        self.proc = subprocess.Popen([LLM_RAY, *self.args], stdout=self.out, stderr=subprocess.STDOUT, env=env)
        return self

    def sample(self) -> dict[int, str]:
        found = processes_of(self.temp_dir, self.proc.pid)
        self.seen |= set(found.values())
        self.most = max(self.most, len(found))
        return found

    def sample_sockets(self) -> None:
        for sock, name in listening_sockets(psutil.Process(self.proc.pid)).items():
            self.sockets.setdefault(sock, set()).add(name)

    def wait_for(self, done, seconds: float, what: str) -> None:
        """Sample until done() or the command exits (then fail) or the time is up (fail)."""
        deadline = time.monotonic() + seconds
        while not done():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {seconds} s:\n{self.output()[-3000:]}"
            self.sample()
            time.sleep(1)

    def run_out(self, seconds: float) -> int:
        """Wait for the exit, sampling its processes every second and its listening sockets five times a
        second (a short-lived one, e.g. torch's rendezvous store, is caught too)."""
        deadline, rounds = time.monotonic() + seconds, 0
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"still running after {seconds} s:\n{self.output()[-3000:]}"
            if rounds % 5 == 0:
                self.sample()
            try:
                self.sample_sockets()
            except psutil.NoSuchProcess:  # it just exited
                pass
            rounds += 1
            time.sleep(0.2)
        return self.proc.returncode

    def left_after_exit(self, seconds: float = GONE_WITHIN_S) -> tuple[dict[int, str], float]:
        """Its processes still there `seconds` after the command exited (none: as soon as all are gone),
        and how long after the exit that was."""
        self.proc.wait()
        start = time.monotonic()
        while (left := processes_of(self.temp_dir, self.proc.pid)) and time.monotonic() - start < seconds:
            time.sleep(0.5)
        return left, time.monotonic() - start

    def output(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        """Whatever happened: the command and its processes are killed, the temp folder removed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.out.close()
        for pid in processes_of(self.temp_dir, self.proc.pid):
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def report(what: str, cmd: Command, left: dict, after_s: float) -> str:
    return (f"{what}: {cmd.before} processes before, {cmd.most} at most while it ran, {len(left)} left "
            f"{after_s:.1f} s after it exited {sorted(left.values())}")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """`llm-ray pipeline` of the debug preset (10 steps) to its end: (the command, its run folder, its exit
    code, its processes left GONE_WITHIN_S after it exited). Serving and training below reuse the run."""
    tmp = tmp_path_factory.mktemp("processes")
    cmd = Command(["pipeline", "--config", "debug", "--set", "data.max_files=null", "--set", f"output_dir={tmp}",
                   "--set", f"data.sources=[{CORPUS}]", "--set", "train.max_steps=10", "--set", "train.eval_every=10",
                   "--set", "train.checkpoint_every=10"], tmp / "pipeline.log").start()
    try:
        code = cmd.run_out(600)
        left, after_s = cmd.left_after_exit()
        print(report("pipeline", cmd, left, after_s))
        yield cmd, tmp / "debug", code, left
    finally:
        cmd.close()


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_to_its_end_leaves_no_process(pipeline_run):
    cmd, _, code, left = pipeline_run
    assert code == 0, cmd.output()[-3000:]
    # the sampling saw the whole Ray: its head, its agents and workers found by their logs
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::RayTrainWorker"} <= cmd.seen
    assert cmd.before == 0 and not left


@pytest.mark.integration
@pytest.mark.slow
def test_a_local_run_listens_on_loopback_only(pipeline_run):
    """Every socket of the pipeline's Ray (GCS, raylet, workers, agents, dashboard) and of training
    (torch's rendezvous store, gloo) listens on 127.0.0.1 only."""
    cmd, _, code, _ = pipeline_run
    assert code == 0
    names = set().union(*cmd.sockets.values())
    assert {"gcs_server", "raylet", "ray::RayTrainWorker"} <= names, names  # the sampling saw the whole run
    assert len(cmd.sockets) >= 15
    exposed = {k: v for k, v in cmd.sockets.items() if not is_loopback(k[0])}
    assert not exposed, f"listening beyond loopback: {exposed}"


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_prints_no_known_harmless_ray_error(pipeline_run):
    cmd, _, code, _ = pipeline_run
    printed = cmd.output()
    assert code == 0 and "Started training worker group" in printed  # Ray Train started its PreemptionWatcher
    assert "PreemptionWatcher" not in printed


@pytest.mark.integration
@pytest.mark.slow
def test_serve_stopped_by_sigterm_leaves_no_process(pipeline_run, tmp_path):
    """`llm-ray serve --run DIR` as a user runs it, on a Ray of its own: it serves the run's best
    checkpoint, the replica answering on the port itself (direct ingress: one replica, auto), on
    loopback only, streaming, and refusing what exceeds its queue with 503. Then SIGTERM (as `timeout`,
    `ray job stop` or a container stop send it): it stops Serve and its Ray, and says so. Ray's C++
    handler used to take SIGTERM: a stack trace, then an abort 3 s later (exit 134), mid-clean-up."""
    from concurrent.futures import ThreadPoolExecutor

    from llm_ray.checkpoint.best import best_checkpoint

    _, run_dir, code, _ = pipeline_run
    assert code == 0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = Command(["serve", "--run", str(run_dir), "--set", f"port={port}", "--set", "cpus_per_replica=0.5",
                   "--set", "max_ongoing_requests=1", "--set", "max_queued_requests=1"], tmp_path / "serve.log").start()
    try:
        cmd.wait_for(lambda: "Ctrl-C stops" in cmd.output(), 300, "serving")
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["status"] == "ok" and health["ingress"] == "direct"
        best = best_checkpoint(run_dir, "run")
        card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        assert card["provenance"]["checkpoint"] == str(best.model_dir)
        listening = [c for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port]
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"} and {c.pid for c in listening} == {health["pid"]}
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "To be", "max_tokens": 8, "stream": True},
                          timeout=60) as r:
            events = [line for line in r.iter_lines() if line]
        assert len(events) > 3 and events[-1] == "data: [DONE]"
        with ThreadPoolExecutor(8) as pool:  # one running, one queued: the rest are refused at once
            statuses = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json={
                "prompt": "To be", "max_tokens": 50}, timeout=60).status_code, range(8)))
        assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}, statuses
        cmd.sample()
        cmd.proc.send_signal(signal.SIGTERM)
        left, after_s = cmd.left_after_exit()
        print(report("serve, SIGTERM", cmd, left, after_s))
        printed = cmd.output()
        assert cmd.proc.returncode == 143, printed[-3000:]
        assert "llm-ray: terminated" in printed and "SIGTERM received" not in printed
        assert {"gcs_server", "raylet", "ray::DashboardAgent"} <= cmd.seen
        assert not left
    finally:
        cmd.close()
    assert f"best checkpoint of run {run_dir} by validation loss: {best.model_dir}" in printed
    assert f"at {url} (OpenAI base_url {url}/v1" in printed


@pytest.mark.integration
@pytest.mark.slow
def test_a_driver_killed_mid_training_leaves_no_process(pipeline_run, tmp_path):
    """`llm-ray train` on the prepared data, SIGKILLed once it trains: nothing of it can clean up, yet
    its Ray goes (Ray's fate-sharing, then the watchdog for what would wait out a timeout)."""
    _, run_dir, code, _ = pipeline_run
    assert code == 0
    cmd = Command(["train", "--config", "debug", "--set", "data.max_files=null", "--set", f"output_dir={tmp_path}",
                   "--set", f"data.sources=[{CORPUS}]", "--set", "name=killed", "--set", "train.max_steps=100000",
                   "--data", str(run_dir / "data")], tmp_path / "train.log").start()
    try:
        cmd.wait_for(lambda: re.search(r"step +\d+/100000", cmd.output()), 300, "training step")
        cmd.sample()
        assert "ray::RayTrainWorker" in cmd.seen and any(t.startswith("ray::TrainController") for t in cmd.seen)
        cmd.proc.kill()
        left, after_s = cmd.left_after_exit()
        print(report("train, driver SIGKILLed", cmd, left, after_s))
        assert not left
    finally:
        cmd.close()


def train_args(run_dir: Path, output_dir: Path, name: str, *overrides: str) -> list[str]:
    """`llm-ray train` of the debug preset on the pipeline run's prepared data."""
    args = ["train", "--config", "debug", "--set", "data.max_files=null", "--set", f"output_dir={output_dir}",
            "--set", f"data.sources=[{CORPUS}]", "--set", f"name={name}", "--data", str(run_dir / "data")]
    for override in overrides:
        args += ["--set", override]
    return args


def losses(state: dict) -> dict[int, float]:
    return {h["step"]: h["train_loss"] for h in state["history"] if "train_loss" in h}


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_checkpoints_the_step_reached_and_the_rerun_goes_on_exactly(pipeline_run, tmp_path):
    """SIGTERM to `llm-ray train` after step 100, with no periodic checkpoint before the end: the workers
    finish the step in flight, checkpoint it and stop; the command says which step and how to resume,
    exits 143 and leaves no process. The rerun resumes from that step, and its losses are those of a run
    never interrupted (2 workers, ZeRO-2: the debug preset's defaults)."""
    from llm_ray.checkpoint import read_train_state

    _, run_dir, code, _ = pipeline_run
    assert code == 0
    steps = ("train.max_steps=300", "train.checkpoint_every=1000", "train.eval_every=1000", "train.log_every=1")
    straight = Command(train_args(run_dir, tmp_path, "straight", *steps), tmp_path / "straight.log").start()
    try:
        assert straight.run_out(300) == 0, straight.output()[-3000:]
    finally:
        straight.close()
    expected = losses(read_train_state(tmp_path / "straight" / "model"))

    cmd = Command(train_args(run_dir, tmp_path, "stopped", *steps), tmp_path / "stopped.log").start()
    try:
        cmd.wait_for(lambda: re.search(r"step +100/300", cmd.output()), 300, "step 100")
        cmd.proc.send_signal(signal.SIGTERM)
        left, after_s = cmd.left_after_exit()
        print(report("train, SIGTERM", cmd, left, after_s))
        printed = cmd.output()
        assert cmd.proc.returncode == 143, printed[-3000:]
        assert not left
    finally:
        cmd.close()
    stopped = re.search(r"llm-ray train: stopped by SIGTERM after step (\d+); its checkpoint is complete: (\S+); "
                        r"run the same command again to resume from that step", printed)
    assert stopped, printed[-3000:]
    step, checkpoint = int(stopped[1]), Path(stopped[2])
    assert 100 <= step < 300
    state = read_train_state(checkpoint)
    trained = [int(s) for s in re.findall(r"step +(\d+)/300 \|", printed)]
    print(f"SIGTERM after step 100 was logged: the workers stopped after step {step}; the last step trained was "
          f"{max(trained)}, so {max(trained) - step} step(s) lost")
    assert state["step"] == state["stopped_at"][-1] == step
    # Nothing trained is lost: the last step the workers logged is the step checkpointed.
    assert max(trained) == step and sorted(losses(state)) == list(range(1, step + 1))

    rerun = Command(train_args(run_dir, tmp_path, "stopped", *steps), tmp_path / "rerun.log").start()
    try:
        assert rerun.run_out(300) == 0, rerun.output()[-3000:]
    finally:
        rerun.close()
    resumed = read_train_state(tmp_path / "stopped" / "model")
    assert resumed["step"] == 300 and resumed["resumed_from"] == [step] and resumed["stopped_at"] == [step]
    got = losses(resumed)
    assert sorted(got) == list(range(1, 301))
    for s in range(step + 1, 301):
        assert got[s] == pytest.approx(expected[s], abs=2e-4), (s, got[s], expected[s])


def test_the_known_harmless_pattern_is_that_line_exactly(monkeypatch):
    from llm_ray.ray_utils import known_harmless_pattern

    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)
    pattern = known_harmless_pattern()
    assert pattern.search(HARMLESS)
    assert not pattern.search(HARMLESS.replace("'PreemptionWatcher'", "'TrainController'"))  # another actor's
    assert not pattern.search(HARMLESS + " (and something else)")
    assert not pattern.search("[2026-12-02 16:15:04,964 E 10269 10315] core_worker.cc:1234: some other error")
    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "^my noise$")  # a user's own pattern still applies
    assert known_harmless_pattern().search("my noise") and known_harmless_pattern().search(HARMLESS)


@pytest.mark.integration
def test_workers_lines_still_show_but_the_known_harmless_one(ray_session, capsys):
    """On the driver, as Ray forwards a worker's stderr: the harmless line goes, the next one shows."""
    import ray

    other = f"[2026-12-02 16:15:05,000 E 1 2] core_worker.cc:99: another error {uuid.uuid4().hex}"

    @ray.remote(num_cpus=0)
    def write(lines):
        for line in lines:
            print(line, file=sys.stderr, flush=True)

    ray.get(write.remote([HARMLESS, other]))
    printed, deadline = "", time.monotonic() + 60
    while other not in printed:  # forwarded by Ray's log monitor, printed by a thread of the driver
        assert time.monotonic() < deadline, printed[-3000:]
        time.sleep(0.5)
        printed += capsys.readouterr().err
    assert "PreemptionWatcher" not in printed  # written before `other`, so it would be there by now
