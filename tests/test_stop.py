"""The driver's side of a stop on SIGTERM (train.stop), on the session's local Ray: the first SIGTERM
sets the workers' flag and returns, so training goes on to its checkpoint; a second SIGTERM, or the
grace period running out, raises Terminated at once. The workers' side runs in test_loop (the loop)
and test_processes (SIGTERM to `llm-ray train`)."""

import os
import signal
import time

import pytest

from llm_ray.ray_utils import Terminated
from llm_ray.train.stop import NAMESPACE, GracefulStop

pytestmark = pytest.mark.integration


def sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)  # the handler runs in the main thread between bytecodes


def test_the_first_sigterm_sets_the_flag_and_a_second_raises(ray_session):
    import ray

    lines = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match="a second SIGTERM"):
        with GracefulStop(30, lines.append) as stop:
            with pytest.raises(ValueError):  # no flag (and no process for it) until asked
                ray.get_actor(stop.name, namespace=NAMESPACE)
            assert not stop.requested
            sigterm_self()  # returns: the command goes on waiting for the workers
            assert stop.requested and ray.get(ray.get_actor(stop.name, namespace=NAMESPACE).ready.remote())
            assert "finish the step in flight and write a checkpoint (up to 30 s" in lines[0]
            sigterm_self()
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_the_grace_period_running_out_raises(ray_session):
    began = time.monotonic()
    with pytest.raises(Terminated, match=r"did not checkpoint within train.preemption_grace_s \(1 s\)"):
        with GracefulStop(1, lambda line: None):
            sigterm_self()
            while time.monotonic() - began < 30:
                time.sleep(0.1)  # as the driver waits in trainer.fit()
    assert time.monotonic() - began < 10


def test_outside_the_main_thread_it_stays_out_of_the_way(ray_session):
    """A Tune trial trains in a thread of its own: no handler, no flag (the workers then never ask)."""
    import threading

    seen = {}

    def trial():
        with GracefulStop(30, print) as stop:
            seen["name"] = stop.name

    thread = threading.Thread(target=trial)
    thread.start()
    thread.join()
    assert seen == {"name": None}
