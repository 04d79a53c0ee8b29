"""Worker functions for tests/test_races.py that spawn a gloo group (spawned processes import them by name)."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist


@dataclass
class FakeContext:
    """The slice of Ray Train's context that universal_checkpoint reads."""

    local_rank: int
    node_rank: int

    def get_local_rank(self) -> int:
        return self.local_rank

    def get_node_rank(self) -> int:
        return self.node_rank


def fake_to_universal(ds_dir: str, tag: str, out_dir: str) -> None:
    """Stands in for DeepSpeed's conversion: one file naming who wrote it."""
    Path(out_dir, "converted").write_text(f"{os.getpid()}")


def universal_folders(rank: int, nodes: list[int], store_path: str, queue) -> None:
    """Worker rank of len(nodes), on node nodes[rank]: reports (rank, folder seen, its file's writer,
    whether the folder still exists after the context)."""
    from llm_ray.train import worker

    worker.to_universal = fake_to_universal  # this process only
    dist.init_process_group("gloo", store=dist.FileStore(store_path, len(nodes)), rank=rank, world_size=len(nodes))
    local_rank = nodes[:rank].count(nodes[rank])
    with worker.universal_checkpoint("unused", FakeContext(local_rank, nodes[rank])) as folder:
        writer = Path(folder, "converted").read_text()
    dist.barrier()  # every leader has removed its folder
    queue.put((rank, folder, writer, os.path.exists(folder)))
    dist.destroy_process_group()
