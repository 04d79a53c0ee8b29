"""Ray Train's torch process group, kept on 127.0.0.1 when every worker is on this machine.

Ray Train's TorchConfig has rank 0 host torch's rendezvous store (a TCPStore), and a TCPStore
server listens on every interface whatever its host name says. On a single-machine Ray (whose
node IP is 127.0.0.1, see ray_utils.init_ray) that would be the one port of a run that faces the
network. Here rank 0 binds the store's socket to 127.0.0.1 itself and hands it to TCPStore
(``master_listen_fd``); gloo and NCCL are pointed at the loopback interface too. On a cluster
(a worker's address is not loopback) Ray Train's own set-up runs unchanged.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train._internal.utils import get_address_and_port
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"
_server = None  # rank 0: (listening socket, store); alive as long as the worker process


def loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addresses):
            return name
    return None


def serve_store(world_size: int, timeout_s: int) -> int:
    """Rank 0: start the rendezvous store on 127.0.0.1 only; returns its port."""
    import torch.distributed as dist

    global _server
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(max(128, world_size))
    port = sock.getsockname()[1]
    store = dist.TCPStore(LOOPBACK, port, world_size, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                          multi_tenant=True, master_listen_fd=sock.fileno(), use_libuv=True)
    _server = (sock, store)
    return port


def join_process_group(backend: str, rank: int, world_size: int, port: int, timeout_s: int) -> None:
    import torch.distributed as dist

    interface = loopback_interface()
    if interface:  # gloo's and NCCL's own sockets on the loopback interface too (every worker is here)
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = interface
    if backend == "nccl":  # as Ray Train's own set-up: a timed-out collective fails instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = LOOPBACK, str(port)
    timeout = timedelta(seconds=timeout_s)
    store = _server[1] if rank == 0 else dist.TCPStore(LOOPBACK, port, world_size, False, timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        address, _ = worker_group.execute_single(0, get_address_and_port)
        if address != LOOPBACK:
            return super().on_start(worker_group, backend_config)
        import ray

        resources = worker_group.get_resources_per_worker()
        if resources.get("TPU", 0) or backend_config.backend not in (None, "gloo", "nccl"):
            return super().on_start(worker_group, backend_config)  # TPUs and custom backends: Ray's set-up
        backend = backend_config.backend or ("nccl" if resources.get("GPU", 0) > 0 else "gloo")
        n, timeout_s = len(worker_group), backend_config.timeout_s
        port = worker_group.execute_single(0, serve_store, n, timeout_s)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, join_process_group, backend, i, n, port, timeout_s)
                 for i in range(n)])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose process group stays on 127.0.0.1 when the workers' node IP is loopback."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
