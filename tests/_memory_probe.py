"""Measure a training worker's peak memory for a config, in a fresh process (so the peak is this
run's): `python tests/_memory_probe.py debug key=value ...` prints JSON with the resident memory
before the model is built, the peak during a few real DeepSpeed steps, and the estimate."""

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(preset: str, overrides: list[str]) -> dict:
    import deepspeed  # noqa: F401  (imported before the baseline: it is part of the runtime)

    from llm_ray.config import load_config, model_spec
    from llm_ray.model import GPT
    from llm_ray.sweep.memory import estimate_memory
    from llm_ray.train.data import BlockOrder, MicroBatches, PackedBlocks, validation_batches
    from llm_ray.train.engine import build_engine
    from llm_ray.checkpoint import TrainState
    from llm_ray.memory import peak_rss_bytes
    from llm_ray.train.loop import run_training

    cfg = load_config(preset, ["train.num_workers=1", *overrides])
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    tmp = Path(tempfile.mkdtemp())
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp / "store"), 1), rank=0, world_size=1)
    micro = cfg.train.micro_batch_size
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        np.save(tmp / f"{split}.npy", rng.integers(0, cfg.vocab_size, (4 * micro, cfg.data.block_size + 1),
                                                   dtype=np.uint16))
    blocks = PackedBlocks([tmp / "train.npy"])
    batches = MicroBatches(blocks, BlockOrder(len(blocks), cfg.seed), 0, 0, 1, micro)
    val = [(torch.from_numpy(b), w) for b, w in
           validation_batches(PackedBlocks([tmp / "val.npy"]), micro, cfg.seed, 0, 1, micro)]
    baseline = rss_bytes()
    engine = build_engine(GPT(model_spec(cfg)), cfg)
    engine.module.activation_checkpointing = cfg.train.activation_checkpointing
    run_training(cfg, engine, batches, val, TrainState(world_size=1), lambda s, m: None, lambda m: None, 0,
                 torch.device("cpu"), log=lambda line: None)
    peak = peak_rss_bytes()
    estimate = estimate_memory(cfg)
    dist.destroy_process_group()
    return {"baseline": baseline, "peak": peak, "measured": peak - baseline,
            "estimated": estimate.total - estimate.runtime,
 "estimate": estimate.as_dict()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
