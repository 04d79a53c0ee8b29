"""Worker functions for tests that spawn a 2-process gloo group (spawned processes import them by name)."""

import torch
import torch.distributed as dist


def worst_loss_per_rank(rank: int, store_path: str, queue) -> None:
    """Each rank reports what worst_loss_over_workers gives when rank 0, then rank 1, has a NaN loss."""
    from llm_ray.train.loop import worst_loss_over_workers

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    seen = []
    for nan_rank in (0, 1):
        loss = torch.tensor(float("nan") if rank == nan_rank else 1.0)
        seen.append(worst_loss_over_workers(loss))
    queue.put((rank, seen))
    dist.destroy_process_group()
