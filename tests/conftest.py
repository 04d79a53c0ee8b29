import os
from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "data" / "corpus"

# Fake credentials for the local S3 server: sentinels that tests check never leak into outputs.
SECRET_ACCESS_KEY = "SENTINEL-secret-key-do-not-log-9f3b"
ACCESS_KEY_ID = "SENTINELKEYID0000000"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def debug_config(tmp: Path, corpus_dir: Path, *overrides: str):
    """The debug preset on the tests' corpus, writing under tmp."""
    from llm_ray.config import load_config

    return load_config("debug", [f"output_dir={tmp}", f"data.sources=[{corpus_dir}]", "data.max_files=null",
                                 *overrides])


@pytest.fixture(scope="session")
def aws_env():
    """Credentials for the moto server through the standard AWS environment variables."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_EC2_METADATA_DISABLED", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY,
                      AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(aws_env):
    """A real S3 endpoint on 127.0.0.1 (moto), with a boto3 client for filling buckets."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    yield endpoint, client
    server.stop()


@pytest.fixture(scope="session")
def ray_session(aws_env, tmp_path_factory):
    """One local Ray for every integration test in the session (started after the AWS env is set,
    so its workers inherit the credentials as they would on a node). Its node cache (copies of remote
    shards and models, see storage.cache_dir) is a temporary folder, not ~/.cache/llm-ray: set before
    Ray starts, as its workers take the environment of that moment."""
    import ray

    from llm_ray.ray_utils import init_ray

    saved = os.environ.get("LLM_RAY_CACHE")
    os.environ["LLM_RAY_CACHE"] = str(tmp_path_factory.mktemp("node-cache"))
    init_ray(num_cpus=2)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("LLM_RAY_CACHE", None)
    else:
        os.environ["LLM_RAY_CACHE"] = saved


@pytest.fixture(scope="session")
def process_group(tmp_path_factory):
    """A one-process gloo group, as Ray Train sets up for each worker (DeepSpeed needs one). One per
    session: DeepSpeed keeps a reference to the first group, so a second init after a destroy breaks it."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def corpus_dir() -> Path:
    return CORPUS


@pytest.fixture(scope="session")
def trained(ray_session, tmp_path_factory):
    """The debug preset as users run it (2 workers, ZeRO-2), checkpointed and validated every 10
    steps, its best checkpoint evaluated: (config, best choice). Served by test_serve and
    test_serve_clients, each on a Serve of its own."""
    from llm_ray.checkpoint.best import best_checkpoint
    from llm_ray.data.prepare import data_dir, prepare
    from llm_ray.eval.run import evaluate
    from llm_ray.train.trainer import train

    tmp = tmp_path_factory.mktemp("serve")
    cfg = debug_config(tmp, CORPUS, "name=served", "train.max_steps=30", "train.eval_every=10",
                       "train.checkpoint_every=10", "train.num_checkpoints_to_keep=3")
    prepare(cfg, log=lambda *_: None)
    train(cfg, data_dir(cfg), log=lambda *_: None)
    choice = best_checkpoint(cfg.run_dir, "run served")
    evaluate(choice.model_dir, split="val", log=lambda *_: None)
    return cfg, choice
