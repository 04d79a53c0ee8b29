"""Scoring throughput of `llm-ray eval`: in-process against Ray Data batch inference, in one run.

    python benchmarks/eval_throughput.py [--checkpoint DIR] [--documents 400] [--actors 2]

Scores the same documents twice with the same DocumentScorer: once in this process (torch
using every core), once as Ray Data map_batches over model actors (one core each), and prints
tokens/s for each and their ratio, plus the largest difference in any document's summed loss.
Without --checkpoint, a `demo`-shaped model with random weights is saved to a temporary folder
(scoring cost does not depend on the weights); the documents are the test corpus' plays, cut
into pieces of 1-4 KB.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def demo_checkpoint(folder: Path, overrides: tuple[str, ...] = ()) -> Path:
    from llm_ray.checkpoint import save_inference
    from llm_ray.config import load_config, model_spec
    from llm_ray.data.tokenizer import train_bpe
    from llm_ray.model import GPT

    cfg = load_config("demo")
    texts = [p.read_text() for p in sorted((ROOT / "tests" / "data" / "corpus").glob("play_*.txt"))]
    tokenizer = train_bpe(texts, cfg.tokenizer.vocab_size, 2, 10**7)
    cfg = load_config("demo", [f"tokenizer.vocab_size={cfg.tokenizer.vocab_size}", *overrides])
    torch.manual_seed(0)
    save_inference(folder, GPT(model_spec(cfg)).state_dict(), cfg, tokenizer.to_str(), {})
    return folder


def documents(n: int) -> list[str]:
    texts = [p.read_text() for p in sorted((ROOT / "tests" / "data" / "corpus").glob("play_*.txt"))]
    rng = np.random.default_rng(0)
    out = []
    while len(out) < n:
        text = texts[len(out) % len(texts)]
        start, size = int(rng.integers(0, len(text) // 2)), int(rng.integers(1000, 4000))
        out.append(text[start : start + size])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained checkpoint (default: demo shape)")
    parser.add_argument("--documents", type=int, default=400)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()

    import ray
    import ray.data

    from llm_ray.checkpoint import load_model
    from llm_ray.eval.scoring import CheckpointScorer, DocumentScorer
    from llm_ray.ray_utils import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or demo_checkpoint(Path(tmp))
        model, tokenizer, cfg = load_model(checkpoint)
        texts = documents(args.documents)
        print(f"{len(texts)} documents, {sum(map(len, texts)) / 1e6:.2f} MB; model context {cfg.model.context_length}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; {os.cpu_count()} cores")

        start = time.perf_counter()
        local = DocumentScorer(model, tokenizer, None, 16).score(texts)
        local_s = time.perf_counter() - start
        tokens = int(local["tokens"].sum())

        init_ray()
        start = time.perf_counter()
        ds = ray.data.from_items([{"doc": i, "text": t} for i, t in enumerate(texts)])
        rows = ds.map_batches(CheckpointScorer, batch_size=8, batch_format="numpy", concurrency=args.actors,
                              num_cpus=1, fn_constructor_kwargs=dict(checkpoint=str(checkpoint), stride=None,
                                                                     batch_size=16, threads=1)).take_all()
        ray_s = time.perf_counter() - start
        nll = np.array([r["nll_sum"] for r in sorted(rows, key=lambda r: r["doc"])])
        ray.shutdown()

    print(f"in-process (torch threads {torch.get_num_threads()}): {tokens / local_s:10,.0f} tokens/s  ({local_s:.1f} s)")
    print(f"Ray Data ({args.actors} actors x 1 core):     {tokens / ray_s:10,.0f} tokens/s  ({ray_s:.1f} s, "
          "actor start-up included)")
    print(f"ratio Ray Data / in-process: {local_s / ray_s:.2f}")
    print(f"largest difference of a document's summed loss: {np.max(np.abs(nll - local['nll_sum'])):.2e} nats")


if __name__ == "__main__":
    main()
