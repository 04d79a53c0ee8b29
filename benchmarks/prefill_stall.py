"""Chunked prefill: what a context-length prompt does to the streams already running, in one run.

    python benchmarks/prefill_stall.py [--context 512] [--streams 8] [--chunks 0,16,32,64] [--trials 8]

The built-in engine, in this process with one torch thread (as a replica with one CPU), on a
`demo`-shaped model with random weights (generation cost does not depend on the weights). In
each trial and for each prefill setting, alternated: 8 streams start and decode; 40 steps after
their start a prompt of context - 1 tokens arrives; they go on until it has its first token and
40 steps more.

For each setting, the running streams' inter-token gaps are split into those that overlap the
long prompt's prefill (from its arrival to its first token) and the others. Printed: the p99 of
each and their ratio (the stall: the target is at most 2x), the ratio of the medians (steadier on
a shared machine), and the long prompt's time to first token, the price of taking it in pieces. Chunk 0 is the whole prompt in one step (before).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def trial(model, tokenizer, chunk: int | None, streams: int, context: int, steps: int = 40) -> dict:
    """One run of the scenario: (gaps during the prefill, gaps outside it, time to first token)."""
    from llm_ray.serve.engine import Engine, Sampling

    class Timed(Engine):
        """The engine, noting when each row gets a token (a token's text may wait for the next one,
        so the events' times are not the tokens')."""

        def _accept(self, row, logits):
            times.setdefault(row, []).append(time.perf_counter())
            super()._accept(row, logits)

    times: dict[int, list[float]] = {}
    engine = Timed(model, tokenizer, eos_id=-1, max_batch_size=streams + 1, prefill_chunk=chunk)
    for i in range(streams):  # short prompts, long answers: they run through the whole trial, in rows 0..streams-1
        prompt = tokenizer.encode(f"Stream {i}: ROMEO: But, soft!").ids
        engine.submit(prompt, Sampling(max_tokens=context - len(prompt) - 1, temperature=0), lambda *event: None)
    while len(times) < streams:  # every stream prefilled and decoding: what comes before is their start
        engine.step()
    engine.step()
    steady = time.perf_counter()
    for _ in range(steps):
        engine.step()
    long_prompt = (tokenizer.encode(" ".join(["ROMEO: But, soft! what light through yonder window breaks?"] * 80))
                   .ids[:context - 1])
    first = []
    arrived = time.perf_counter()
    engine.submit(long_prompt, Sampling(max_tokens=1, temperature=0),
                  lambda c, text, finish, lps: first.append(time.perf_counter()))
    while not first:
        engine.step()
    for _ in range(steps):
        engine.step()
    during, outside = [], []
    for row in range(streams):
        stamps = times[row]
        for before, after in zip(stamps, stamps[1:]):
            if before >= steady:
                (during if after > arrived and before < first[0] else outside).append(after - before)
    return {"during": during, "outside": outside, "ttft": first[0] - arrived}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--chunks", default="0,16,32,64", help="prefill_chunk_tokens settings, 0 for whole prompts")
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()

    from eval_throughput import demo_checkpoint
    from llm_ray.checkpoint import load_model

    torch.set_num_threads(1)
    chunks = [int(c) or None for c in args.chunks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, _ = load_model(demo_checkpoint(Path(tmp), (f"model.context_length={args.context}",)))
    trial(model, tokenizer, chunks[0], args.streams, args.context, steps=5)  # warm up
    runs = {c: [] for c in chunks}
    for _ in range(args.trials):  # settings alternated: both see the same machine
        for c in chunks:
            runs[c].append(trial(model, tokenizer, c, args.streams, args.context))
    print(f"{args.streams} streams decoding, a {args.context - 1}-token prompt arriving; {args.trials} trials, "
          "one torch thread")
    print(f"{'prefill':>14} {'gap p99 during':>15} {'gap p99 other':>14} {'p99 ratio':>10} {'p50 ratio':>10} "
          f"{'prompt TTFT p50':>16}")
    for c, results in runs.items():
        during = [g for r in results for g in r["during"]]
        outside = [g for r in results for g in r["outside"]]
        ttft = percentile([r["ttft"] for r in results], 50)
        p_during, p_outside = percentile(during, 99), percentile(outside, 99)
        name = f"chunks of {c}" if c else "whole prompt"
        p50 = percentile(during, 50) / percentile(outside, 50)
        print(f"{name:>14} {1000 * p_during:>12.1f} ms {1000 * p_outside:>11.1f} ms {p_during / p_outside:>9.2f}x "
              f"{p50:>9.2f}x {1000 * ttft:>13.1f} ms")


if __name__ == "__main__":
    main()
