"""The reference for llm-ray's multi-worker overhead: a plain N-process PyTorch loop (DDP over gloo).

Each process trains the same model with llm-ray's optimizer on random tokens, one torch thread per
core share; DDP all-reduces the gradients. No Ray, no DeepSpeed. Spawned processes import this file
by name, so it holds only what they run.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def worker(rank: int, world: int, store_path: str, spec, batch: int, steps: int, threads: int, queue) -> None:
    from llm_ray.config import TrainConfig
    from llm_ray.model import GPT
    from llm_ray.train.engine import build_optimizer, param_groups

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GPT(spec)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(param_groups(model, TrainConfig().weight_decay), TrainConfig())
    data = torch.randint(0, spec.vocab_size, (batch, spec.context_length + 1), generator=torch.Generator().manual_seed(rank))
    warmup = 3
    for step in range(steps + warmup):
        if step == warmup:
            dist.barrier()
            start = time.perf_counter()
        _, loss = ddp(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    dist.barrier()
    if rank == 0:
        queue.put(world * steps * batch * spec.context_length / (time.perf_counter() - start))
    dist.destroy_process_group()


def tokens_per_sec(spec, batch: int, steps: int, world: int, threads: int, store_path: str) -> float:
    """Tokens per second of all processes together."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(world, store_path, spec, batch, steps, threads, queue), nprocs=world)
    return queue.get()
