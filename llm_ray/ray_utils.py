"""Starting or joining Ray: the one place the CLI and jobs touch ray.init."""

from __future__ import annotations

import logging
import os


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in $RAY_ADDRESS (as under `ray job submit`), else start a local Ray.

    A local Ray's dashboard (and with it the Jobs API, which runs code for whoever reaches
    it) binds to 127.0.0.1 only. Ray Train's monitoring needs the dashboard's state API.
    """
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress lines are enough
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")


def alive_nodes() -> int:
    """The number of live nodes of the Ray cluster this process joined (1 without Ray)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive")) if ray.is_initialized() else 1
