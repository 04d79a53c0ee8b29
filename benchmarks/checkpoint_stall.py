"""How long training stalls for a checkpoint on S3: uploads in step (train.checkpoint_upload sync, what
llm-ray did before) against in the background (async, the default), in one run.

    python benchmarks/checkpoint_stall.py [--steps 400] [--every 100] [--mb-per-s 20] [--delay-ms 50]

S3 is a moto server on 127.0.0.1 behind a proxy (tests/_s3_proxy.py) that gives every write request
--delay-ms of latency and its body --mb-per-s of bandwidth, as a link to a remote bucket would. Two
model sizes (the debug preset, and 4x its width: 16x the checkpoint), 2 workers, ZeRO-2. For each:
the seconds the workers spent in checkpoints (the stall, from the run's logged checkpoint_seconds; a
background upload still running when the next checkpoint comes is waited for, and counted), per
checkpoint, the median step time, and the whole run's training seconds; then async / sync.
The two modes alternate within each size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm_ray.checkpoint import read_train_state  # noqa: E402
from llm_ray.config import load_config  # noqa: E402
from llm_ray.data.prepare import data_dir, prepare  # noqa: E402
from llm_ray.ray_utils import init_ray  # noqa: E402
from llm_ray.train.trainer import train  # noqa: E402
from tests._s3_proxy import S3Proxy  # noqa: E402

SIZES = {"debug": [], "wide-256": ["model.n_embd=256", "model.n_head=4"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--mb-per-s", type=float, default=20.0, help="upload bandwidth to S3")
    p.add_argument("--delay-ms", type=float, default=50.0, help="latency added to each write request")
    args = p.parse_args()

    import logging
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true",
                      AWS_DEFAULT_REGION="us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    proxy = S3Proxy(endpoint, write_delay_s=args.delay_ms / 1000, write_mb_per_s=args.mb_per_s)
    init_ray()
    out = Path(tempfile.mkdtemp(prefix="checkpoint-stall-"))
    print(f"S3 on 127.0.0.1 behind a proxy: +{args.delay_ms:g} ms per write request, {args.mb_per_s:g} MB/s; "
          f"{args.steps} steps, a checkpoint every {args.every}; 2 workers, ZeRO-2")
    print(f"{'model':<16} {'upload':<6} {'stall/ckpt s':>12} {'median step ms':>14} {'train s':>8} {'model/ MB':>9}")
    try:
        for size, overrides in SIZES.items():
            base = load_config("debug", [f"output_dir={out}", f"data.sources=[{ROOT / 'tests/data/corpus'}]",
                                         "data.max_files=null", f"train.max_steps={args.steps}",
                                         f"train.checkpoint_every={args.every}", "train.log_every=1",
                                         f"train.eval_every={args.steps}", f"train.num_checkpoints_to_keep={args.steps}",
                                         "train.storage_path=s3://bench/runs", f"data.s3.endpoint_url={proxy.endpoint}",
                                         *overrides])
            prepare(base, log=lambda *_: None)
            figures = {}
            for mode in ("sync", "async"):
                run = base.model_copy(update={"name": f"{mode}-{size.split()[0]}"}, deep=True)
                run.train.checkpoint_upload = mode
                began = time.perf_counter()
                result = train(run, data_dir(base), log=lambda *_: None)
                wall = time.perf_counter() - began
                rows = [h for h in read_train_state(result.checkpoint)["history"] if "train_seconds" in h]
                stalls = [h["checkpoint_seconds"] for h in rows if h["checkpoint_seconds"] > 0]
                steps = sorted(h["train_seconds"] for h in rows)
                size_mb = sum(f.stat().st_size for f in Path(result.checkpoint).rglob("*") if f.is_file()) / 1e6
                figures[mode] = sum(stalls) / max(len(stalls), 1)
                print(f"{size:<16} {mode:<6} {figures[mode]:>12.2f} {1000 * steps[len(steps) // 2]:>14.1f} "
                      f"{sum(h['train_seconds'] + h['checkpoint_seconds'] for h in rows):>8.1f} {size_mb:>9.1f}"
                      f"   (command {wall:.0f} s)")
            print(f"{size:<16} async / sync stall per checkpoint: {figures['async'] / figures['sync']:.3f}")
    finally:
        proxy.close()
        server.stop()


if __name__ == "__main__":
    main()
