"""Starting or joining Ray: the one place the CLI and jobs touch ray.init, and where a command's Ray
is made to end with the command."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import llm_ray

LOOPBACK = "127.0.0.1"
# Ray treats a machine as a single-node, laptop set-up (its default on macOS and Windows) when this is 0.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Error lines Ray prints on every run that say nothing about the run, as whole-line patterns (after the
# "[time E pid tid] " prefix) so that any other line, this message for another actor included, still shows.
KNOWN_HARMLESS = (
    # Ray Train starts its PreemptionWatcher actor with max_restarts=-1 and the workers' actor handles as
    # arguments; the core worker warns that a restart would fail should those arguments be lost.
    r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' and ID: '[0-9a-f]+' has constructor "
    r"arguments in the object store and max_restarts > 0\. If the arguments in the object store go out of scope "
    r"or are lost, the actor restart will fail\. See https://github\.com/ray-project/ray/issues/53727 for more "
    r"details\.",
)
WATCH_INTERVAL_S = 1.0  # how often the watchdog notes the command's processes and checks the command is alive


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread (see unwind_on_sigterm): a KeyboardInterrupt, so a command
    stopped by `timeout`, `ray job stop` or a container's stop unwinds as on Ctrl-C."""


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in $RAY_ADDRESS (as under `ray job submit`), else start a local Ray that
    listens on 127.0.0.1 only.

    Ray's processes (GCS, raylet, workers, agents) bind their servers to the node's IP, and the
    dashboard, whose Jobs API runs code for whoever reaches it, to dashboard_host. A local Ray
    gets 127.0.0.1 for both. Asking for node IP 127.0.0.1 alone is not enough: Ray replaces a
    loopback node IP with the machine's routable address unless it is in its single-machine mode
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the default on a laptop running macOS), which this
    sets for the local Ray only. tests/test_cluster.py lists the sockets of a running job.
    Ray Train's monitoring needs the dashboard's state API, so the dashboard stays on.

    A local Ray ends with this process, however it ends: on a normal exit, Ctrl-C, or SIGTERM (which
    unwind_on_sigterm turns into Terminated) Ray's exit hook runs ray.shutdown; after a SIGKILL, Ray's
    fate-sharing and the watchdog (start_watchdog) stop what is left. tests/test_processes.py counts.
    """
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress lines are enough
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    hide_known_harmless_lines()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        join(os.environ["RAY_ADDRESS"])
        llm_ray.mark("ray")
        return
    single_machine()
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK)
    unwind_on_sigterm()
    llm_ray.mark("ray")
    start_watchdog()


def join(address: str, **kwargs) -> None:
    """ray.init on an existing cluster. A cluster on this machine's 127.0.0.1 is joined in single-machine
    mode: otherwise Ray would look for it at the machine's routable address, where it does not listen."""
    import ray

    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1"):
        single_machine()
    ray.init(address=address, **kwargs)
    unwind_on_sigterm()


def single_machine() -> None:
    """Put Ray in its single-machine mode in this process and the processes it starts."""
    from ray._private import ray_constants

    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when Ray resolves the node IP; set at its import


def alive_nodes() -> int:
    """The number of live nodes of the Ray cluster this process joined (1 without Ray)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive")) if ray.is_initialized() else 1


def unwind_on_sigterm() -> None:
    """Make SIGTERM raise Terminated in the main thread, so finally blocks and Ray's exit hook
    (ray.shutdown) run as on Ctrl-C.

    ray.init hands SIGTERM to Ray's C++ failure handler, which prints a stack trace and arms a 3-second
    alarm that aborts the process (exit 134): a command stopped by SIGTERM was cut off mid-cleanup,
    before ray.shutdown, and the Ray it had started died with it by SIGKILL, its agents then waiting 60 s
    on the dead GCS. Called after ray.init, this takes SIGTERM back (other fatal signals stay Ray's)."""
    if threading.current_thread() is threading.main_thread():  # signal.signal works there only
        signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum, frame):
    raise Terminated


def start_watchdog() -> subprocess.Popen:
    """Start a process that, once this one is gone however it ended (SIGKILL included), kills what is
    left of the processes it started: the local Ray's and theirs.

    Ray has its own fate-sharing: the processes ray.init starts (GCS, raylet, dashboard, monitors) get
    SIGKILL when this process dies (prctl PR_SET_PDEATHSIG), and the raylet's workers exit a few seconds
    after the raylet. But its DashboardAgent and RuntimeEnvAgent, on finding the raylet dead, first report
    it to the GCS, which died too, and wait 60 s for the answer. The watchdog notes this process's
    descendants every WATCH_INTERVAL_S; once this process is gone it SIGKILLs those still running
    (psutil checks each is the process it noted, not a reused pid), and their descendants. It runs in a
    session of its own: Ctrl-C in a terminal goes to the foreground process group, and this must outlive
    the command it watches. Python's -I keeps this file's folder (llm_ray/) off its sys.path."""
    return subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def watch(pid: int, interval_s: float = WATCH_INTERVAL_S) -> None:
    """The watchdog: note pid's descendants until pid is gone, then SIGKILL those still running."""
    import psutil  # Ray's and DeepSpeed's dependency; imported here, as the watchdog alone needs it

    try:
        command = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, psutil.Process] = {}
    while True:
        try:
            alive = command.status() != psutil.STATUS_ZOMBIE  # a zombie has ended; its parent has not reaped it
            descendants = command.children(recursive=True)
        except psutil.NoSuchProcess:
            alive, descendants = False, []
        # a descendant stays noted while it runs, also once orphaned (its parent gone, e.g. the raylet)
        seen = {p.pid: p for p in seen.values() if p.is_running()} | {p.pid: p for p in descendants}
        seen.pop(os.getpid(), None)  # the watchdog is one of them
        if not alive:
            break
        time.sleep(interval_s)
    doomed = dict(seen)
    for p in seen.values():  # and what they started since the last look
        try:
            doomed.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.Error:
            pass
    doomed.pop(os.getpid(), None)
    for p in doomed.values():
        try:
            p.kill()
        except psutil.Error:  # already gone
            pass


def known_harmless_pattern() -> re.Pattern:
    """KNOWN_HARMLESS, and the user's own $RAY_DEDUP_LOGS_SKIP_REGEX if set, as one pattern."""
    patterns = [*(f"{p}$" for p in KNOWN_HARMLESS), *filter(None, [os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")])]
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def hide_known_harmless_lines() -> None:
    """Keep KNOWN_HARMLESS out of the worker output Ray forwards to this driver.

    These are not log records of this process (no logging.Filter sees them): a worker writes them to
    its stderr, Ray's log monitor forwards them and the driver prints them. Ray's own filter for
    forwarded lines is the skip pattern of its deduplicators ($RAY_DEDUP_LOGS_SKIP_REGEX, read when
    ray is imported); this sets it on both (stdout and stderr) from known_harmless_pattern. With
    RAY_DEDUP_LOGS=0, Ray prints every line unfiltered."""
    from ray._private import ray_logging

    pattern = known_harmless_pattern()
    for deduplicator in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        deduplicator.skip_re = pattern


if __name__ == "__main__":  # the watchdog (start_watchdog)
    watch(int(sys.argv[1]))
