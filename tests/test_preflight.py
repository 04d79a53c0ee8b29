"""`llm-ray preflight` and the jobs/ entrypoints that run it first (no Ray cluster needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_ray.cli import main
from llm_ray.preflight import (
    FAIL,
    GIB,
    PASS,
    WARN,
    Cluster,
    Node,
    check_memory,
    check_object_store,
    check_sources,
    check_storage,
    check_vocabulary,
    check_workers,
    preflight,
)
from tests.conftest import debug_config

ROOT = Path(__file__).resolve().parents[1]
LAPTOP = Cluster([Node(cpus=2, gpus=0, memory=16 * GIB, object_store=4 * GIB)], "a laptop", joined=False)


@pytest.fixture(autouse=True)
def _this_machine(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the checks describe this machine, whatever the shell says


def two_nodes(cpus=2, gpus=0, memory=16 * GIB):
    return Cluster([Node(cpus, gpus, memory, 4 * GIB) for _ in range(2)], "two nodes", joined=False)


def status(rows, name):
    return next(r for r in rows if r.name == name)


def test_the_debug_config_passes_every_check_on_this_machine(tmp_path, corpus_dir):
    rows = preflight(debug_config(tmp_path, corpus_dir))
    assert [r.name for r in rows] == ["config", "cluster", "data sources", "storage", "vocabulary and blocks",
                                      "workers", "memory", "object store"]
    assert all(r.status in (PASS, WARN) for r in rows), rows
    assert status(rows, "memory").status == PASS and "GiB per worker" in status(rows, "memory").detail


def test_workers_that_do_not_fit_fail_with_the_fields_and_what_the_cluster_has(tmp_path, corpus_dir):
    cfg = debug_config(tmp_path, corpus_dir, "train.num_workers=8", "train.cpus_per_worker=1",
                       "train.total_batch_tokens=4096")
    row = check_workers(cfg, LAPTOP)
    assert row.status == FAIL
    assert "train.num_workers 8" in row.detail and "2 CPUs" in row.detail and "hold 2" in row.detail
    assert check_workers(cfg, Cluster([Node(8, 0, GIB, GIB)], "big", False)).status == PASS
    # one GPU per worker: CPUs alone do not make room
    gpu = debug_config(tmp_path, corpus_dir, "train.use_gpu=true")
    assert check_workers(gpu, two_nodes(gpus=0)).status == FAIL
    assert check_workers(gpu, two_nodes(gpus=1)).status == PASS
    assert check_workers(debug_config(tmp_path, corpus_dir), two_nodes(gpus=1)).status == WARN  # GPUs left idle


def test_fractional_cpus_count_as_ray_counts_them_and_a_joined_cluster_may_still_grow(
        tmp_path, corpus_dir):
    tenth = debug_config(tmp_path, corpus_dir, "train.num_workers=30", "train.cpus_per_worker=0.1",
                         "train.micro_batch_size=1", "train.total_batch_tokens=1920")
    assert check_workers(tenth, Cluster([Node(3, 0, GIB, GIB)], "", False)).status == PASS  # 3 // 0.1 is 29.0
    gpus = debug_config(tmp_path, corpus_dir, "train.use_gpu=true")
    assert check_workers(gpus, LAPTOP).status == FAIL  # this machine will not grow
    row = check_workers(gpus, Cluster([Node(8, 0, 16 * GIB, GIB)], "head", joined=True))
    assert row.status == WARN and "autoscaler" in row.detail  # a cluster may: Ray Train waits


def test_placement_strategy_changes_what_fits(tmp_path, corpus_dir):
    spread = debug_config(tmp_path, corpus_dir, "train.placement_strategy=STRICT_SPREAD")
    assert check_workers(spread, LAPTOP).status == FAIL  # two workers need two nodes
    assert check_workers(spread, two_nodes()).status == PASS
    pack = debug_config(tmp_path, corpus_dir, "train.placement_strategy=STRICT_PACK", "train.cpus_per_worker=2")
    assert check_workers(pack, two_nodes()).status == FAIL  # 2 x 2 CPUs on one 2-CPU node
    assert check_workers(debug_config(tmp_path, corpus_dir, "train.cpus_per_worker=2"), two_nodes()).status == PASS


def test_memory_compares_the_estimate_with_a_workers_share(tmp_path, corpus_dir):
    cfg = debug_config(tmp_path, corpus_dir)  # about 0.6 GiB per worker, two workers share a node
    assert check_memory(cfg, LAPTOP).status == PASS
    small = Cluster([Node(2, 0, int(1.0 * GIB), GIB)], "small", joined=False)
    row = check_memory(cfg, small)
    assert row.status == FAIL and "ZeRO-2" in row.detail and "0.50 GiB per worker" in row.detail
    big_model = debug_config(tmp_path, corpus_dir, "model.n_layer=24", "model.n_embd=1024", "model.n_head=16")
    assert check_memory(big_model, LAPTOP).status == PASS
    assert check_memory(big_model.model_copy(deep=True), Cluster([Node(2, 0, 4 * GIB, GIB)], "", False)).status == FAIL


def test_storage_fails_naming_the_field(tmp_path, corpus_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    row = check_storage(debug_config(blocker, corpus_dir), LAPTOP)
    assert row.status == FAIL and row.detail.startswith("output_dir:")
    # a local output_dir on two nodes: each would write its own disk
    row = check_storage(debug_config(tmp_path, corpus_dir), two_nodes())
    assert row.status == FAIL and "2 nodes" in row.detail and "output_dir" in row.detail
    shared = debug_config(tmp_path, corpus_dir, "data.shared_filesystem=true")
    assert check_storage(shared, two_nodes()).status == PASS


def test_sources_missing_here_or_in_s3_fail(tmp_path, corpus_dir, s3_server):
    endpoint, client = s3_server
    client.create_bucket(Bucket="pre-flight")
    client.put_object(Bucket="pre-flight", Key="corpus/a.txt", Body=b"hello")
    assert check_sources(debug_config(tmp_path, corpus_dir)).status == PASS
    row = check_sources(debug_config(tmp_path, corpus_dir), two_nodes())
    assert row.status == FAIL and "2 nodes" in row.detail  # each node would look on its own disk
    assert check_sources(debug_config(tmp_path, corpus_dir, "data.shared_filesystem=true"), two_nodes()).status == PASS
    row = check_sources(debug_config(tmp_path, tmp_path / "nowhere"))
    assert row.status == FAIL and "nowhere" in row.detail and row.detail.startswith("data.sources")
    s3 = [f"data.s3.endpoint_url={endpoint}"]
    assert check_sources(debug_config(tmp_path, "s3://pre-flight/corpus/", *s3)).status == PASS
    row = check_sources(debug_config(tmp_path, "s3://pre-flight/elsewhere/", *s3))
    assert row.status == FAIL and "s3://pre-flight/elsewhere/" in row.detail


def test_prepared_data_must_agree_with_the_config(tmp_path, corpus_dir):
    cfg = debug_config(tmp_path, corpus_dir)
    assert "no prepared data yet" in check_vocabulary(cfg).detail
    data = tmp_path / "debug" / "data"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"vocab_size": 512, "block_size": 64}))
    assert check_vocabulary(cfg).status == PASS
    (data / "manifest.json").write_text(json.dumps({"vocab_size": 512, "block_size": 32}))
    row = check_vocabulary(cfg)
    assert row.status == FAIL and "block_size 32" in row.detail and "data.block_size 64" in row.detail
    (data / "manifest.json").write_text(json.dumps({"vocab_size": 1000, "block_size": 64}))
    assert "1000 tokens" in check_vocabulary(cfg).detail and check_vocabulary(cfg).status == FAIL


def test_object_store_smaller_than_two_blocks_per_cpu_warns(tmp_path, corpus_dir):
    cfg = debug_config(tmp_path, corpus_dir)
    assert check_object_store(cfg, LAPTOP).status == PASS
    tight = Cluster([Node(16, 0, 16 * GIB, GIB)], "tight", joined=False)
    row = check_object_store(cfg, tight)
    assert row.status == WARN and "spill" in row.detail


def test_cli_prints_the_table_and_exits_1_on_a_failure(tmp_path, corpus_dir, capsys):
    args = ["preflight", "--config", "debug", "--set", f"output_dir={tmp_path}", "--set",
            f"data.sources=[{corpus_dir}]"]
    assert main(args) == 0
    assert "preflight: all checks passed" in capsys.readouterr().out
    assert main([*args, "--set", "train.num_workers=16", "--set", "train.total_batch_tokens=8192",
                 "--set", "train.cpus_per_worker=1"]) == 1
    out = capsys.readouterr().out
    assert "workers" in out and "FAIL" in out and "preflight: FAILED" in out


def test_job_entrypoints_map_their_arguments_to_the_preflight(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    from _entry import preflight_args

    assert preflight_args("train", ["--config", "debug", "--set", "a=1"]) == ["--config", "debug", "--set=a=1"]
    assert preflight_args("pipeline", []) == ["--config", "demo"]
    assert preflight_args("tune", ["--sweep", "tuning/debug.yaml", "--resume"]) == ["--sweep", "tuning/debug.yaml"]
    assert preflight_args("eval", ["--checkpoint", "x"]) == ["--checkpoint", "x"]
    assert preflight_args("serve", ["--checkpoint", "s3://b/hf"]) is None  # vLLM reads it itself
    assert preflight_args("serve", ["--checkpoint", "hf-export", "--engine", "vllm"]) is None
    assert preflight_args("train", ["--config", "demo", "--data", "s3://b/data"]) == [
        "--config", "demo", "--data", "s3://b/data"]
    for name in ("prepare", "pretrain", "eval", "tune", "serve", "pipeline"):
        assert (ROOT / "jobs" / f"{name}.py").is_file()


def test_a_job_run_by_a_python_without_llm_ray_prints_advice_not_a_traceback(tmp_path):
    bare = tmp_path / "bare"  # a python with nothing installed: as on a head started outside the venv
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(bare / "bin" / "python"), "jobs/pipeline.py", "--config", "debug"], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert "cannot import pydantic" in done.stderr and "head node's PATH" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_failed_preflight_stops_the_job_before_anything_starts(tmp_path, corpus_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "jobs/pretrain.py", "--config", "debug", "--set", f"output_dir={blocker}",
                           "--set", f"data.sources=[{corpus_dir}]"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 1
    assert "storage  " in done.stdout and "FAIL" in done.stdout
    assert "`train` not started" in done.stderr
    assert "Started a local Ray" not in done.stdout + done.stderr
