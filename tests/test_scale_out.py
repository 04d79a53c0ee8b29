"""Scaling past one machine: a whole run in object storage (no shared disk needed)."""

import json
from pathlib import Path

import pytest

from tests.conftest import ACCESS_KEY_ID, CORPUS, SECRET_ACCESS_KEY, debug_config

pytestmark = pytest.mark.integration


def bucket_objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            objects[item["Key"][len(prefix):]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return objects


def test_debug_pipeline_on_s3_runs_resumes_and_leaves_no_local_run_folder(ray_session, s3_server, tmp_path,
                                                                          tmp_path_factory, monkeypatch):
    """output_dir: s3://...: prepare's shards, keep lists, tokenizer and report, the checkpoints, the model
    and the evaluation all go to the S3 server on 127.0.0.1; workers read the packed shards from there
    (copied once per node); a rerun skips every prepare stage and resumes training from S3; nothing is
    written to a local run folder and no secret reaches the bucket."""
    from llm_ray.checkpoint import read_train_state
    from llm_ray.pipeline import run_pipeline
    from llm_ray.storage import node_cache

    endpoint, client = s3_server
    client.create_bucket(Bucket="team")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # a relative local folder would appear here
    steps = ("train.checkpoint_every=10", "train.eval_every=10", "train.log_every=10")
    cfg = debug_config(tmp_path, CORPUS, "output_dir=s3://team/runs", f"data.s3.endpoint_url={endpoint}",
                       "name=remote", "train.max_steps=20", *steps)
    first = run_pipeline(cfg, log=lambda *_: None)
    assert first.train.step == 20 and first.evaluation["report"] == "s3://team/runs/remote/eval"

    objects = bucket_objects(client, "team", "runs/remote/")
    for name in ("config.yaml", "loss_curve.png", "data/manifest.json", "data/prepare_report.json",
                 "data/prepare_report.md", "data/prepare_report.png", "data/tokenizer/tokenizer.json",
                 "data/documents/_stage.json", "data/dedup/_stage.json", "data/pack/_stage.json",
                 "model/model.safetensors", "model/config.yaml", "eval/eval.json", "eval/eval.md", "eval/eval.png"):
        assert name in objects, (name, sorted(objects))
    manifest = json.loads(objects["data/manifest.json"])
    shards = [s["file"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    documents = json.loads(objects["data/documents/_stage.json"])["shards"]
    assert all(f"data/{f}" in objects for f in shards)
    assert all(f"data/documents/{s}" in objects and f"data/dedup/{s}" in objects for s in documents)
    assert any(k.startswith("checkpoints/remote/checkpoint_") and k.endswith("model/model.safetensors")
               for k in objects)
    # The workers' copies of the packed shards are byte for byte the objects (same blocks, same order).
    cache = node_cache("data", manifest["stage_keys"]["pack"])
    assert cache.is_relative_to(tmp_path_factory.getbasetemp())  # the session's node cache, not ~/.cache/llm-ray
    for file in shards:
        split, name = file.split("/")[-2:]
        assert (cache / split / name).read_bytes() == objects[f"data/{file}"]
    for key, blob in objects.items():
        assert SECRET_ACCESS_KEY.encode() not in blob and ACCESS_KEY_ID.encode() not in blob, key
    assert list(workdir.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]

    lines = []
    cfg.train.max_steps = 30
    second = run_pipeline(cfg, log=lines.append)
    for stage in ("documents", "dedup", "tokenizer", "pack"):
        assert f"{stage}: up to date, skipped" in lines, lines
    assert any("resuming from step 20" in line for line in lines), lines
    state = read_train_state(second.train.checkpoint)
    assert state["step"] == 30 and state["resumed_from"] == [20]
    assert state["data_path"] == "s3://team/runs/remote/data"
    assert list(workdir.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]
    assert Path(second.train.checkpoint).is_relative_to(node_cache("models"))



def collect(queue, procs, timeout_s: float = 600) -> list:
    """One result per process, sorted; fails as soon as a process dies without giving one."""
    import queue as queues
    import time

    results, deadline = [], time.monotonic() + timeout_s
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=2))
        except queues.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead and time.monotonic() < deadline, f"worker exit codes {dead} (see the output above)"
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return sorted(results)


@pytest.mark.parametrize("overrides", [[], ["model.tie_embeddings=false"]])
def test_zero3_never_builds_the_whole_model_and_saves_it_one_parameter_at_a_time(tmp_path, overrides):
    """Two gloo processes at ZeRO-3 (no Ray): right after building, each holds half of every parameter;
    the streamed model.safetensors equals the weights gathered whole, equals a plain build with the same
    seed (same initialization as ZeRO-0/1/2), and reloads to the engine's logits exactly. An output layer
    with its own weight is saved; a tied one is not (it is the token embedding)."""
    import torch
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from llm_ray.checkpoint import tied_names
    from llm_ray.config import load_config, model_spec
    from llm_ray.model import GPT
    from tests._zero3_workers import build_and_save

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=build_and_save, args=(rank, str(tmp_path), overrides, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = collect(queue, procs)
    total = results[0][2]
    for _, held, _, _ in results:
        assert abs(held - total / 2) <= 0.001 * total, (held, total)  # half, up to padding

    saved = load_file(str(tmp_path / "model.safetensors"))
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    cfg = load_config("debug", ["train.zero_stage=3", *overrides])
    tied = tied_names(model_spec(cfg))
    whole = {k: v for k, v in reference["whole"].items() if k not in tied}
    assert saved.keys() == whole.keys()
    assert ("lm_head.weight" in saved) == (not cfg.model.tie_embeddings)
    assert all(torch.equal(saved[k], whole[k]) for k in whole)
    torch.manual_seed(cfg.seed)
    plain = GPT(model_spec(cfg))
    from llm_ray.train.engine import param_groups

    assert results[0][3] == len(param_groups(plain, 0.1)[0]["params"]) > 0  # weight decay on the same matrices
    assert all(torch.equal(saved[k], v) for k, v in plain.state_dict().items() if k not in tied)
    missing, unexpected = plain.load_state_dict(saved, strict=False)
    assert set(missing) == set(tied) and not unexpected
    plain.eval()
    batch = torch.arange(2 * cfg.data.block_size).reshape(2, -1) % cfg.vocab_size
    with torch.no_grad():
        assert torch.equal(plain(batch)[0], reference["logits"])


@pytest.mark.parametrize("settings", [{}, {"exact": False}, {"near": False}, {"threshold": 0.8}])
def test_distributed_dedup_finds_the_clusters_of_the_driver_algorithm(ray_session, tmp_path, settings):
    """The rounds of Ray tasks (dedup_stage) against the former all-in-memory clustering, on planted
    copies spread over three documents shards: same clusters, same kept documents (the first of each
    cluster in corpus order), same cluster keys, same counters."""
    from collections import Counter

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm_ray.config import DedupConfig
    from llm_ray.data import dedup
    from llm_ray.data.dedup_stage import cluster_shards
    from llm_ray.storage import Location
    from tests.test_dedup import TEXTS, change_words, find_clusters, rewrap

    d = DedupConfig(**settings)
    texts = [TEXTS[0], TEXTS[1], change_words(TEXTS[0], 0.03, 1), TEXTS[2], rewrap(TEXTS[1]), TEXTS[3],
             "A new preface.\n\n" + TEXTS[2], TEXTS[4], change_words(TEXTS[0], 0.04, 2), TEXTS[1], TEXTS[5]]
    a, b = dedup.permutations(d.num_perm, d.seed)
    sigs = np.stack([dedup.minhash(dedup.shingle_hashes(t, d.shingle, d.ngram), a, b) for t in texts])
    exact = [dedup.exact_hash(t) for t in texts]
    keys = [f"doc{i:02d}" for i in range(len(texts))]
    root = Location(str(tmp_path))
    shards = []
    for n, (lo, hi) in enumerate([(0, 4), (4, 5), (5, 11)]):
        shard = root / "documents" / f"part-{n}.parquet"
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.table({"doc_key": keys[lo:hi], "exact": exact[lo:hi],
                                 "bytes": [len(t.encode()) for t in texts[lo:hi]],
                                 "signature": [s.tobytes() for s in sigs[lo:hi]]}), buffer)
        shard.write_bytes(buffer.getvalue().to_pybytes())
        shards.append(shard)
    found = cluster_shards(shards, d, root / "dedup", seed=0, val_fraction=0.2)

    reference = find_clusters(np.array(keys), np.array(exact), sigs, d)
    labels = reference["labels"]
    smallest = {}
    for label, h in zip(labels.tolist(), exact):
        smallest[label] = min(smallest.get(label, h), h)
    kept = pq.read_table(str(tmp_path / "dedup")).to_pylist()
    assert {r["doc_key"]: r["cluster_key"] for r in kept} == {
        keys[i]: smallest[i] for i in range(len(texts)) if labels[i] == i}
    sizes = Counter(labels.tolist())
    assert found["docs_in"] == len(texts) and found["docs_out"] == len(sizes)
    assert found["clusters_with_copies"] == sum(1 for s in sizes.values() if s > 1)
    assert found["largest_cluster"] == max(sizes.values())
    assert found["exact_duplicates"] == (reference["exact_pairs"] if d.exact else 0)
    if d.near:
        assert found["near_duplicate_pairs"] >= 1
    assert found["clusters_with_copies"] >= 1  # something was merged in every setting
