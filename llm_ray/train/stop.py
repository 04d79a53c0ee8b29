"""Stopping a run on request at a step boundary, with a checkpoint: what a spot instance's notice,
`ray job stop` or a pod's deletion asks of a training job, by sending SIGTERM to its driver.

The driver (``GracefulStop``, around ``trainer.fit()``) turns the first SIGTERM into a flag: a small
named actor, created only then (no process for it before), and gives the workers
``train.preemption_grace_s`` to act on it. A thread in rank 0 looks the name up (``StopWatch``); at every step boundary the workers agree on it with one all-reduce of a
single integer, so all of them stop after the same step, write a checkpoint and return. A second
SIGTERM, or the grace running out, raises ``Terminated`` in the driver at once: the last complete
checkpoint is kept (checkpoint.manifest skips a half-written one).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import torch
import torch.distributed as dist

from llm_ray.ray_utils import Terminated

POLL_INTERVAL_S = 0.5  # how often rank 0 looks for the driver's flag; a stop waits at most this plus a step
NAMESPACE = "llm-ray"


class StopFlag:
    """The driver's request: that this named actor (no CPU) exists means stop."""

    def ready(self) -> bool:
        return True


class TrainingStopped(Exception):
    """Training stopped on request (SIGTERM) with a complete checkpoint at `step`."""

    def __init__(self, step: int, checkpoint: str, finished: bool):
        self.step, self.checkpoint, self.finished = step, checkpoint, finished
        resume = ("training had reached train.max_steps" if finished
                  else "run the same command again to resume from that step")
        super().__init__(f"stopped by SIGTERM after step {step}; its checkpoint is complete: {checkpoint}; {resume}")


class GracefulStop:
    """Around trainer.fit() in the main thread: the first SIGTERM sets the workers' flag and starts
    the grace period; a second SIGTERM, or the end of the grace period, raises Terminated. Elsewhere
    (a Tune trial's thread, where signal handlers cannot be set) it does nothing and `name` is None."""

    def __init__(self, grace_s: float, log):
        self.grace_s, self.log = grace_s, log
        self.name: str | None = None  # the flag's actor name, for the workers
        self.flag = None
        self.requested_at: float | None = None
        self.expired = False
        self._previous = None
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            return self
        self.name = f"llm-ray-stop-{uuid.uuid4().hex}"
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        if self.requested_at is not None:
            if self.expired:
                raise Terminated(f"the workers did not checkpoint within train.preemption_grace_s "
                                 f"({self.grace_s:g} s); the last complete checkpoint is kept")
            raise Terminated("a second SIGTERM: stopped without waiting for a checkpoint; the last complete "
                             "checkpoint is kept")
        import ray

        self.requested_at = time.monotonic()
        self.flag = ray.remote(num_cpus=0)(StopFlag).options(name=self.name, namespace=NAMESPACE).remote()
        self.log(f"train: SIGTERM: the workers finish the step in flight and write a checkpoint (up to "
                 f"{self.grace_s:g} s, train.preemption_grace_s); a second SIGTERM stops at once")
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, as a second SIGTERM

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self.flag is not None:
            import ray

            try:
                ray.kill(self.flag)
            except Exception:  # noqa: BLE001 - Ray already shut down (the command is unwinding)
                pass


class StopWatch:
    """In each worker: whether the driver asked to stop, the same answer on every worker at a step.

    Rank 0 looks for the flag (by its name) in a thread; ``requested()`` is a collective (every worker calls it at every
    step boundary): a MAX all-reduce of one integer over a gloo group, on the host, so that a GPU
    run adds no device synchronization."""

    def __init__(self, flag: str | None, rank: int, poll_s: float = POLL_INTERVAL_S):
        self._seen = threading.Event()
        self._closed = threading.Event()
        self._group = None
        # without a flag (a Tune trial) there is nothing to agree on: every worker got the same payload
        if flag is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # the default group is NCCL on GPUs: a CPU tensor needs a gloo group (every rank creates it)
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            self._collective = True
        else:
            self._collective = False
        if rank == 0 and flag is not None:
            threading.Thread(target=self._poll, args=(flag, poll_s), daemon=True, name="llm-ray-stop-watch").start()

    def _poll(self, name: str, poll_s: float) -> None:
        import ray

        while not self._closed.wait(poll_s):
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:  # not created: no stop asked
                continue
            except Exception:  # noqa: BLE001 - the cluster is going away: Ray ends the workers itself
                return
            self._seen.set()
            return

    def requested(self) -> bool:
        if not self._collective:
            return self._seen.is_set()
        value = torch.tensor([1 if self._seen.is_set() else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._group)
        return bool(value.item())

    def close(self) -> None:
        self._closed.set()
