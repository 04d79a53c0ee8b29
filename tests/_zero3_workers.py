"""Worker function for the ZeRO-3 build-and-save test: a 2-process gloo group without Ray (spawned
processes import it by name)."""

import os

import torch
import torch.distributed as dist


def build_and_save(rank: int, folder: str, overrides: list[str], queue) -> None:
    """Build the model as a ZeRO-3 worker does, report the share of parameters held, run the
    DeepSpeed engine on a fixed batch, and write the weights streamed (rank 0 writes)."""
    from llm_ray.config import load_config
    from llm_ray.train.engine import build_engine, build_model, param_groups, parameter_share
    from llm_ray.train.worker import consolidated_state_dict, write_zero3_weights

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(folder, "store"), 2), rank=rank,
                            world_size=2)
    cfg = load_config("debug", ["train.zero_stage=3", "train.num_workers=2", "train.total_batch_tokens=1024",
                                *overrides])
    model = build_model(cfg)
    held, total = parameter_share(model)
    decayed = len(param_groups(model, 0.1)[0]["params"])  # matrices, recognised in their partitions
    engine = build_engine(model, cfg)
    engine.eval()
    batch = torch.arange(2 * cfg.data.block_size).reshape(2, -1) % cfg.vocab_size
    with torch.no_grad():
        logits = engine(batch)[0]
    path = os.path.join(folder, "model.safetensors") if rank == 0 else None
    write_zero3_weights(engine, path)
    whole = consolidated_state_dict(engine, 3, rank)  # the former way: every parameter gathered at once
    if rank == 0:
        torch.save({"logits": logits, "whole": whole}, os.path.join(folder, "reference.pt"))
    queue.put((rank, held, total, decayed))
    dist.barrier()
    dist.destroy_process_group()
