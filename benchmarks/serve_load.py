"""Serving under load: the built-in generator behind Ray Serve on 127.0.0.1, in one run.

    python benchmarks/serve_load.py [--checkpoint DIR] [--max-tokens 64] [--overload-seconds 30]

Prints, each against a baseline measured in the same run:
- streamed requests at concurrency 1, 4 and 16: output tokens/s, p50/p99 time to first token
  and total latency; the batching gain is throughput at 16 over throughput at 1 (also for the
  engine alone, in this process, to separate batching from Serve's overheads);
- the KV cache: 256 new tokens with the engine (one forward pass per token over the cache)
  against recomputing the whole context for every token;
- HTTP overhead: p50 latency of the same greedy request over HTTP minus in-process, through
  Serve's proxy and with direct ingress (the replica answering on its own port), alternated;
- an overload run at 4x the app's capacity (max_ongoing_requests + max_queued_requests) for
  --overload-seconds: responses by status, the replica's memory at the start, peak and end.
Without --checkpoint, a `demo`-shaped model (context 512) with random weights is used: the
cost of generating does not depend on the weights, and random weights never stop early.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

PROMPT = "ROMEO: But, soft! what light through yonder window breaks?"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def stream_one(client, url: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total, tokens) of one streamed greedy request."""
    started = time.perf_counter()
    first, tokens = None, 0
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"] and first is None:
                first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first, time.perf_counter() - started, tokens


async def load_level(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        results = []

        async def worker(n: int):
            for _ in range(n):
                results.append(await stream_one(client, url, max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttft, total, tokens = zip(*results)
    return {"concurrency": concurrency, "requests": len(results), "tokens_per_s": sum(tokens) / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "total_p50": percentile(total, 50), "total_p99": percentile(total, 99)}


def kv_cache_speedup(checkpoint: str, new_tokens: int) -> tuple[float, float]:
    """Seconds for new_tokens greedy tokens with the engine, and by recomputing the whole context."""
    from llm_ray.checkpoint import load_model
    from llm_ray.serve.engine import Engine, Sampling

    model, tokenizer, _ = load_model(checkpoint)
    prompt = tokenizer.encode(PROMPT).ids
    engine = Engine(model, tokenizer, eos_id=-1, max_batch_size=1)
    engine.generate([prompt], Sampling(max_tokens=8, temperature=0))  # warm up
    started = time.perf_counter()
    cached = engine.generate([prompt], Sampling(max_tokens=new_tokens, temperature=0))[0]
    with_cache = time.perf_counter() - started
    ids = torch.tensor([prompt])
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(new_tokens):  # no cache: every token runs the model over the whole sequence
            logits, _ = model(ids)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    recompute = time.perf_counter() - started
    assert tokenizer.decode(ids[0, len(prompt):].tolist()) == cached.texts[0], "the two ways disagree"
    return with_cache, recompute


def engine_batching_gain(checkpoint: str, max_tokens: int) -> tuple[float, float]:
    """Output tokens/s of the engine alone (in this process, one torch thread as a replica) for 1
    and for 16 requests decoded together."""
    from llm_ray.checkpoint import load_model
    from llm_ray.serve.engine import Engine, Sampling

    model, tokenizer, _ = load_model(checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(model, tokenizer, eos_id=-1, max_batch_size=16)
    prompt = tokenizer.encode(PROMPT).ids
    rates = []
    for batch in (1, 16):
        engine.generate([prompt] * batch, Sampling(max_tokens=8, temperature=0))  # warm up
        started = time.perf_counter()
        engine.generate([prompt] * batch, Sampling(max_tokens=max_tokens, temperature=0))
        rates.append(batch * max_tokens / (time.perf_counter() - started))
    torch.set_num_threads(threads)
    return rates[0], rates[1]


def http_overhead(checkpoint: str, urls: list[str], max_tokens: int, repeats: int) -> tuple[list[float], float]:
    """(p50 of HTTP minus in-process latency through each url, p50 in-process latency) for the same
    greedy request.

    In-process and each url are measured in alternation, so that all see the same load on a shared
    machine. In process, the request runs through the same engine (one torch thread, as the replica)."""
    import httpx

    from llm_ray.checkpoint import load_model
    from llm_ray.serve.engine import Engine, Sampling

    model, tokenizer, _ = load_model(checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(model, tokenizer, eos_id=-1, max_batch_size=16)
    prompt = tokenizer.encode(PROMPT).ids
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    direct, over = [], [[] for _ in urls]
    with httpx.Client(timeout=60) as client:
        for i in range(repeats + 3):  # the first 3 warm up
            started = time.perf_counter()
            engine.generate([prompt], Sampling(max_tokens=max_tokens, temperature=0))
            d = time.perf_counter() - started
            for url, times in zip(urls, over):
                started = time.perf_counter()
                client.post(f"{url}/v1/completions", json=body).raise_for_status()
                if i >= 3:
                    times.append(time.perf_counter() - started - d)
            if i >= 3:
                direct.append(d)
    torch.set_num_threads(threads)
    return [statistics.median(times) for times in over], statistics.median(direct)


def health_latency(url: str, repeats: int) -> float:
    """p50 seconds of GET /health: Serve's proxy hop to the replica and back, nothing else."""
    import httpx

    times = []
    with httpx.Client(timeout=60) as client:
        for _ in range(repeats):
            started = time.perf_counter()
            client.get(f"{url}/health").raise_for_status()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


async def overload(url: str, clients: int, seconds: float, pid: int) -> dict:
    """clients closed-loop clients for seconds: statuses, 503 latency, the replica's RSS."""
    import httpx
    import psutil

    replica = psutil.Process(pid)
    statuses, refused, rss = Counter(), [], [replica.memory_info().rss]
    stop_at = time.perf_counter() + seconds

    async def client_loop(client):
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 32})
                statuses[r.status_code] += 1
                if r.status_code == 503:
                    refused.append(time.perf_counter() - started)
                    await asyncio.sleep(0.05)  # a polite client backs off a little
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1

    async def sample_memory():
        while time.perf_counter() < stop_at:
            rss.append(replica.memory_info().rss)
            await asyncio.sleep(1)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(sample_memory(), *(client_loop(client) for _ in range(clients)))
    rss.append(replica.memory_info().rss)
    return {"statuses": dict(statuses), "refused_p50_ms": 1000 * statistics.median(refused) if refused else None,
            "rss_start": rss[0], "rss_warm": rss[min(5, len(rss) - 1)], "rss_peak": max(rss), "rss_end": rss[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint folder (default: demo-shaped random weights, context 512)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per load request (default 64)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    parser.add_argument("--kv-tokens", type=int, default=256, help="new tokens for the KV-cache comparison")
    parser.add_argument("--overload-seconds", type=float, default=30)
    args = parser.parse_args()

    import httpx
    import ray
    from ray import serve

    from eval_throughput import demo_checkpoint
    from llm_ray.config.serve import ServeConfig
    from llm_ray.serve.app import build_app
    from llm_ray.serve.launch import direct_ingress_env

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(demo_checkpoint(Path(tmp), ("model.context_length=512",)))
        # Ray and Serve first: their background processes slow everything on 2 cores, so every
        # in-process baseline is measured while they run, as the replica's figures are. Direct
        # ingress on: the replica answers on 8000 itself, and Serve's proxy on 8100 routes to it.
        os.environ.update(direct_ingress_env(8000), RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT="8010")  # 2 apps
        ray.init(num_cpus=2, include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": 8100})
        cfg = ServeConfig(checkpoint=checkpoint, port=8000, max_batch_size=16, max_ongoing_requests=32,
                          max_queued_requests=64)
        serve.run(build_app(cfg.model_dump(mode="json")), name="load", route_prefix="/")
        url, proxy = "http://127.0.0.1:8000", "http://127.0.0.1:8100"
        assert httpx.get(f"{url}/health").json()["ingress"] == "direct"
        with_cache, recompute = kv_cache_speedup(checkpoint, args.kv_tokens)
        print(f"KV cache, {args.kv_tokens} new tokens: {with_cache:.2f} s with the cache, {recompute:.2f} s "
              f"recomputing the context: speedup {recompute / with_cache:.1f}x")
        one, sixteen = engine_batching_gain(checkpoint, args.max_tokens)
        print(f"engine alone, {args.max_tokens} tokens: {one:.0f} tokens/s for 1 request, {sixteen:.0f} for 16 "
              f"together: batching gain {sixteen / one:.1f}x")
        for tokens in (1, 16):
            (through_proxy, direct_ingress), in_process = http_overhead(checkpoint, [proxy, url], tokens, 40)
            print(f"HTTP overhead (p50, {tokens} greedy tokens, over {1000 * in_process:.1f} ms in-process): "
                  f"{1000 * through_proxy:.1f} ms through Serve's proxy, {1000 * direct_ingress:.1f} ms with direct "
                  f"ingress ({direct_ingress / through_proxy:.2f} of the proxy's)")
        print(f"  for scale: GET /health (no body, no engine) p50 {1000 * health_latency(proxy, 40):.1f} ms through "
              f"the proxy, {1000 * health_latency(url, 40):.1f} ms direct")
        rows = [asyncio.run(load_level(url, c, max(c, args.requests), args.max_tokens)) for c in (1, 4, 16)]
        print(f"\n{'concurrency':>11} {'requests':>8} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'total p50':>9} {'total p99':>9}")
        for r in rows:
            print(f"{r['concurrency']:>11} {r['requests']:>8} {r['tokens_per_s']:>9.1f} {r['ttft_p50']:>8.3f}s "
                  f"{r['ttft_p99']:>8.3f}s {r['total_p50']:>8.3f}s {r['total_p99']:>8.3f}s")
        print(f"batching gain over HTTP (tokens/s at 16 over 1): {rows[2]['tokens_per_s'] / rows[0]['tokens_per_s']:.1f}x")

        serve.delete("load")
        over_cfg = ServeConfig(checkpoint=checkpoint, max_batch_size=8, max_ongoing_requests=8, max_queued_requests=8)
        serve.run(build_app(over_cfg.model_dump(mode="json")), name="over", route_prefix="/over")
        over = f"{proxy}/over"  # through the proxy: the replica of a second app gets the next direct port

        capacity = 8 + 8
        pid = httpx.get(f"{over}/health").json()["pid"]
        o = asyncio.run(overload(over, 4 * capacity, args.overload_seconds, pid))
        mib = 1 << 20
        print(f"\noverload: {4 * capacity} clients for {args.overload_seconds:g} s against capacity {capacity}: "
              f"responses {o['statuses']}; 503 p50 {o['refused_p50_ms']:.1f} ms; replica RSS idle "
              f"{o['rss_start'] / mib:.0f} MiB, after 5 s {o['rss_warm'] / mib:.0f} MiB, peak {o['rss_peak'] / mib:.0f} "
              f"MiB, end {o['rss_end'] / mib:.0f} MiB (end / after 5 s: {o['rss_end'] / o['rss_warm']:.3f})")
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
