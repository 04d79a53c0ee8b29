"""Starting or joining Ray: the one place the CLI and jobs touch ray.init."""

from __future__ import annotations

import logging
import os

LOOPBACK = "127.0.0.1"
# Ray treats a machine as a single-node, laptop set-up (its default on macOS and Windows) when this is 0.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
    """
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress lines are enough
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        join(os.environ["RAY_ADDRESS"])
        return
    single_machine()
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK)


def join(address: str, **kwargs) -> None:
    """ray.init on an existing cluster. A cluster on this machine's 127.0.0.1 is joined in single-machine
    mode: otherwise Ray would look for it at the machine's routable address, where it does not listen."""
    import ray

    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1"):
        single_machine()
    ray.init(address=address, **kwargs)


def single_machine() -> None:
    """Put Ray in its single-machine mode in this process and the processes it starts."""
    from ray._private import ray_constants

    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when Ray resolves the node IP; set at its import


def alive_nodes() -> int:
    """The number of live nodes of the Ray cluster this process joined (1 without Ray)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive")) if ray.is_initialized() else 1
