"""The data stage on a shared local Ray: S3 reads, dedup, leak-proof splits, resume, bad input."""

import gzip
import json
import shutil

import pyarrow.parquet as pq
import pytest

from llm_ray.config import load_config
from llm_ray.data import transforms
from llm_ray.data.prepare import PrepareError, data_dir, prepare
from tests.conftest import ACCESS_KEY_ID, CORPUS, SECRET_ACCESS_KEY
from tests.test_dedup import change_words, rewrap

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TEXTS = {p.name: p.read_text() for p in sorted(CORPUS.glob("play_*.txt"))}


def config(tmp_path, sources, *overrides):
    return load_config("debug", [f"output_dir={tmp_path}", f"data.sources={json.dumps(sources)}",
                                 "data.max_files=null", "data.files_per_task=4", *overrides])


class Log(list):
    def __call__(self, line):
        self.append(line)

    def has(self, fragment):
        return any(fragment in line for line in self)


@pytest.fixture(scope="module")
def s3_corpus(s3_server):
    """The test corpus in a bucket, plus planted near-duplicates and a few bad files."""
    endpoint, client = s3_server
    client.create_bucket(Bucket="prep")
    for name, text in TEXTS.items():
        client.put_object(Bucket="prep", Key=f"corpus/{name}", Body=text.encode())
    client.put_object(Bucket="prep", Key="corpus/dup_edited.txt", Body=change_words(TEXTS["play_00.txt"], 0.03, 1).encode())
    client.put_object(Bucket="prep", Key="corpus/dup_rewrapped.txt", Body=rewrap(TEXTS["play_01.txt"]).encode())
    client.put_object(Bucket="prep", Key="corpus/dup_header.txt.gz",
                      Body=gzip.compress(b"A REPRINT, with a new title page.\n\n" + TEXTS["play_02.txt"].encode()))
    client.put_object(Bucket="prep", Key="corpus/broken.txt.gz", Body=gzip.compress(TEXTS["play_04.txt"].encode())[:300])
    client.put_object(Bucket="prep", Key="corpus/empty.txt", Body=b"")
    return endpoint


def test_prepare_from_s3_dedups_splits_and_reports(ray_session, s3_corpus, tmp_path):
    cfg = config(tmp_path, ["s3://prep/corpus/"], f"data.s3.endpoint_url={s3_corpus}", "data.test_fraction=0.1")
    log = Log()
    manifest = prepare(cfg, log=log)
    out = data_dir(cfg)
    report = json.loads((out / "prepare_report.json").read_text())

    assert report["files"]["read"] == 19
    assert report["files"]["failed"] == [["s3://prep/corpus/broken.txt.gz", report["files"]["failed"][0][1]]]
    assert "gzip" in report["files"]["failed"][0][1]
    assert report["notes"] == {"empty_file": 1}
    # 14 plays + 3 planted copies read; the copies fold into their originals' clusters.
    assert report["stages"][1]["docs_out"] == 17 and report["stages"][2]["docs_out"] == 14
    assert report["dedup"]["clusters_with_copies"] == 3
    assert sum(manifest["documents"].values()) == 14 and all(manifest["documents"].values())
    kept = {row["doc_key"] for row in pq.read_table(out / "dedup").to_pylist()}
    # One representative per cluster, deterministically the smallest key.
    assert {"s3://prep/corpus/dup_edited.txt", "s3://prep/corpus/dup_rewrapped.txt"} <= kept
    assert "s3://prep/corpus/play_00.txt" not in kept and "s3://prep/corpus/play_01.txt" not in kept
    assert {tuple(p["documents"]) for p in report["dedup"]["example_pairs"]} >= {
        ("s3://prep/corpus/dup_edited.txt", "s3://prep/corpus/play_00.txt")}
    for name in ("prepare_report.md", "prepare_report.png", "manifest.json", "tokenizer/tokenizer.json"):
        assert (out / name).is_file()
    assert "prepare report" in "\n".join(log)
    # No secret anywhere in what prepare wrote or printed.
    for path in out.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert SECRET_ACCESS_KEY.encode() not in blob and ACCESS_KEY_ID.encode() not in blob, path
    assert not any(SECRET_ACCESS_KEY in line or ACCESS_KEY_ID in line for line in log)


def split_of_each_doc(cfg):
    rows = pq.read_table(data_dir(cfg) / "dedup").to_pylist()
    return {r["doc_key"].rsplit("/", 1)[-1]: r["cluster_key"] for r in rows}


def test_rerun_skips_and_changes_rerun_only_dependent_stages(ray_session, tmp_path):
    shutil.copytree(CORPUS, tmp_path / "corpus")
    cfg = config(tmp_path, [str(tmp_path / "corpus")])
    first = prepare(cfg, log=Log())

    log = Log()
    assert prepare(cfg, log=log)["stage_keys"] == first["stage_keys"]
    assert all(log.has(f"{stage}: up to date, skipped") for stage in ("documents", "dedup", "tokenizer", "pack"))

    log = Log()
    cfg2 = config(tmp_path, [str(tmp_path / "corpus")], "data.block_size=32")
    changed = prepare(cfg2, log=log)
    assert [log.has(f"{s}: up to date") for s in ("documents", "dedup", "tokenizer", "pack")] == [True] * 3 + [False]
    assert changed["stage_keys"]["pack"] != first["stage_keys"]["pack"]

    log = Log()
    prepare(config(tmp_path, [str(tmp_path / "corpus")], "dedup.threshold=0.6"), log=log)
    assert [log.has(f"{s}: up to date") for s in ("documents", "dedup", "tokenizer", "pack")] == [True] + [False] * 3

    # The shingle length shapes the MinHash signatures, which the documents pass computes.
    log = Log()
    prepare(config(tmp_path, [str(tmp_path / "corpus")], "dedup.ngram=4"), log=log)
    assert not log.has("documents: up to date")

    # A changed input file reruns everything from the documents stage.
    (tmp_path / "corpus" / "play_03.txt").write_text(TEXTS["play_03.txt"] + "\nA new line.\n")
    log = Log()
    prepare(cfg, log=log)
    assert not log.has("documents: up to date")


def test_interrupted_run_resumes_unfinished_shards(ray_session, tmp_path):
    cfg = config(tmp_path, [str(CORPUS)])
    first = prepare(cfg, log=Log())
    docs = data_dir(cfg) / "documents"
    # As if killed mid-stage: the stage never finished and one shard never completed.
    record = json.loads((docs / "_stage.json").read_text())
    (docs / "_stage.json").write_text(json.dumps({"key": record["key"], "complete": False}))
    victim = sorted(docs.glob("part-*.parquet"))[1]
    victim.unlink()
    victim.with_suffix(".json").unlink()
    log = Log()
    again = prepare(cfg, log=log)
    assert log.has("in 4 shards (3 already done)")
    assert again["documents"] == first["documents"] and again["splits"] == first["splits"]


def test_splits_are_stable_across_task_sizes_and_follow_clusters(ray_session, tmp_path):
    a = config(tmp_path / "a", [str(CORPUS)])
    b = config(tmp_path / "b", [str(CORPUS)], "data.files_per_task=1")
    ma, mb = prepare(a, log=Log()), prepare(b, log=Log())
    assert ma["documents"] == mb["documents"] and ma["splits"].keys() == mb["splits"].keys()
    assert split_of_each_doc(a) == split_of_each_doc(b)
    for split in ("train", "val"):
        # The same documents tokenize to the same tokens; packing is per shard, so only the
        # unfilled tail of each shard differs.
        assert ma["splits"][split]["document_tokens"] == mb["splits"][split]["document_tokens"]
    # Each document's split is a function of its duplicate-cluster key.
    u = {k: transforms.split_key(c, a.seed) for k, c in split_of_each_doc(a).items()}
    assert sum(v < a.data.val_fraction for v in u.values()) == ma["documents"]["val"]


def test_too_many_failed_files_fail_with_the_list(ray_session, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    for i in range(3):
        (corpus / f"bad{i}.txt.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    with pytest.raises(PrepareError) as err:
        prepare(config(tmp_path, [str(corpus)], "data.max_failed_files=2"), log=Log())
    message = str(err.value)
    assert "3 files could not be read" in message and "data.max_failed_files" in message
    assert all(f"bad{i}.txt.gz" in message for i in range(3))
