"""Locations: the same path operations on a local folder and on S3 (a moto server on 127.0.0.1)."""

import os
import pickle

import numpy as np
import pytest

from llm_ray.config import S3Config
from llm_ray.storage import Location, StorageError, check_shared, check_writable, local_copy


def exercise(root: Location) -> None:
    """Every operation the pipeline uses, checked the same way wherever root is."""
    shard = root / "stage" / "part-1.parquet"
    assert not shard.exists() and not shard.is_file()
    shard.write_bytes(b"payload")
    shard.with_suffix(".json").write_json({"rows": 3})
    (root / "stage" / "sub" / "x.txt").write_text("é")
    assert shard.is_file() and shard.read_bytes() == b"payload"
    assert shard.with_suffix(".json").read_json() == {"rows": 3}
    assert (root / "stage" / "sub" / "x.txt").read_text() == "é"
    assert (root / "stage").is_dir() and shard.name == "part-1.parquet" and shard.stem == "part-1"
    assert shard.parent == root / "stage"
    assert [p.name for p in (root / "stage").iterdir()] == ["part-1.json", "part-1.parquet", "sub"]
    with shard.open_input() as f:
        assert f.read() == b"payload"
    clone = pickle.loads(pickle.dumps(shard))  # what a Ray task receives
    assert clone == shard and clone.read_bytes() == b"payload"
    (root / "stage").rmtree()
    assert not shard.exists() and (root / "stage").iterdir() == []
    (root / "stage").rmtree()  # nothing there: no error


def test_local_location(tmp_path):
    exercise(Location.parse(tmp_path / "runs"))
    loc = Location.parse(tmp_path) / "a.npy"
    np.save(loc, np.arange(3))  # a local location is path-like
    assert np.load(os.fspath(loc)).tolist() == [0, 1, 2]


def test_s3_location_and_copies(s3_server, tmp_path):
    endpoint, client = s3_server
    client.create_bucket(Bucket="store")
    s3 = S3Config(endpoint_url=endpoint)
    root = Location.parse("s3://store/runs/", s3)
    assert root.uri == "s3://store/runs" and root.remote
    exercise(root)
    with pytest.raises(StorageError, match="object storage, not a local path"):
        os.fspath(root / "x")
    (root / "m" / "a.bin").write_bytes(b"a")
    (root / "m" / "deep" / "b.bin").write_bytes(b"b")
    down = (root / "m").download(tmp_path / "down")
    assert sorted(str(p.relative_to(down)) for p in down.rglob("*") if p.is_file()) == ["a.bin", "deep/b.bin"]
    (tmp_path / "tree" / "d").mkdir(parents=True)
    (tmp_path / "tree" / "d" / "f.txt").write_text("f")
    (root / "up").upload(tmp_path / "tree")
    assert (root / "up" / "d" / "f.txt").read_text() == "f"
    cached = local_copy(root / "m" / "a.bin", tmp_path / "cache")
    assert cached == tmp_path / "cache" / "a.bin" and cached.read_bytes() == b"a"
    check_writable(root)
    with pytest.raises(StorageError, match="output_dir: s3://missing-bucket/x: the bucket does not exist"):
        check_writable(Location.parse("s3://missing-bucket/x", s3))
    with pytest.raises(StorageError, match="cannot write anonymously"):
        check_writable(Location.parse("s3://store/x", S3Config(endpoint_url=endpoint, anonymous=True)))


@pytest.mark.parametrize("value", ["gs://b/x", "s3://Bad_Bucket/x", "s3://b/../x", "builtin:shakespeare"])
def test_bad_locations_name_the_field(value):
    with pytest.raises(StorageError, match="output_dir"):
        Location.parse(value)
    with pytest.raises(ValueError, match=r"not a relative path"):
        Location.parse("/tmp") / "../etc"


def test_output_dir_takes_s3_and_refuses_other_uris():
    from llm_ray.config import ConfigError, load_config

    cfg = load_config("debug", ["output_dir=s3://bucket/runs", "name=x"])
    assert cfg.run_location.uri == "s3://bucket/runs/x" and cfg.run_location.remote
    with pytest.raises(StorageError, match="object storage"):
        cfg.run_dir  # noqa: B018 (a run on S3 has no local folder)
    with pytest.raises(ConfigError, match="output_dir.*unsupported scheme 'gs'"):
        load_config("debug", ["output_dir=gs://bucket/runs"])


def test_multi_node_clusters_refuse_local_paths_unless_shared(tmp_path):
    local, remote = Location.parse(tmp_path), Location.parse("s3://bucket/x")
    check_shared({"output_dir": local}, nodes=1, shared_filesystem=False)  # one machine: fine
    check_shared({"output_dir": remote, "train.storage_path": remote}, nodes=3, shared_filesystem=False)
    check_shared({"output_dir": local}, nodes=3, shared_filesystem=True)  # the user says it is shared
    with pytest.raises(StorageError) as err:
        check_shared({"output_dir": local, "--data": remote, "train.storage_path": local}, nodes=2,
                     shared_filesystem=False)
    message = str(err.value)
    assert "2 nodes" in message and "output_dir" in message and "train.storage_path" in message
    assert "--data" not in message and "data.shared_filesystem: true" in message and "s3://" in message
