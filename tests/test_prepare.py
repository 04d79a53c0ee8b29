"""The data stage on a shared local Ray: S3 reads, dedup, leak-proof splits, resume, bad input."""

import gzip
import json
import shutil

import pyarrow.parquet as pq
import pytest

from llm_ray.config import load_config
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
    out = data_dir(cfg).local()
    report = json.loads((out / "prepare_report.json").read_text())

    assert report["files"]["read"] == 19
    assert report["files"]["failed"] == [["s3://prep/corpus/broken.txt.gz", report["files"]["failed"][0][1]]]
    assert "gzip" in report["files"]["failed"][0][1]
    assert report["notes"] == {"empty_file": 1}
    # 14 plays + 3 planted copies read; the copies fold into their originals' clusters.
    after = {s["step"]: s["documents"] for s in report["funnel"]}
    assert after["cleaned text"] == 17 and after["after near dedup (kept)"] == 14
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
    rows = pq.read_table(data_dir(cfg).local() / "dedup").to_pylist()
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
    docs = data_dir(cfg).local() / "documents"
    # As if killed mid-stage: the stage never finished, one group of files never wrote its marker and
    # one of that group's shards never completed.
    record = json.loads((docs / "_stage.json").read_text())
    (docs / "_stage.json").write_text(json.dumps({"key": record["key"], "complete": False}))
    victim = sorted(docs.glob("part-*.parquet"))[1]
    victim.unlink()
    victim.with_suffix(".json").unlink()
    (docs / f"group-{victim.name.split('-')[1]}.json").unlink()
    log = Log()
    again = prepare(cfg, log=log)
    assert log.has("in 4 groups (3 already done)") and log.has("in 4 shards (1 cleaned now, 3 reused)")
    assert again["documents"] == first["documents"] and again["splits"] == first["splits"]


def planted_corpus(folder):
    """The 14 plays plus near-copies of 7 of them: clusters of two whose split must be one."""
    folder.mkdir(parents=True)
    for name, text in TEXTS.items():
        (folder / name).write_text(text)
    for i, (name, text) in enumerate(sorted(TEXTS.items())[:7]):
        copy = change_words(text, 0.03, i) if i % 2 else rewrap(text)
        (folder / f"copy_{name}").write_text(copy)
    return folder


def split_blocks(cfg, manifest):
    """{split: every packed block of the split, concatenated in manifest order}."""
    import numpy as np

    return {split: np.concatenate([np.load(data_dir(cfg).local() / s["file"]) for s in info["shards"]])
            for split, info in manifest["splits"].items()}


def split_texts(cfg, manifest) -> dict[str, list[str]]:
    """{split: its documents, decoded from the packed blocks prepare wrote}. Blocks overlap by one
    token, so each shard's token stream is rebuilt first; documents end at end-of-text, and a shard's
    last one may be cut short (its tail did not fill a block)."""
    import numpy as np
    from tokenizers import Tokenizer

    from llm_ray.data.tokenizer import EOT

    tokenizer = Tokenizer.from_file(str(data_dir(cfg).local() / manifest["tokenizer"]))
    eot = tokenizer.token_to_id(EOT)
    texts = {}
    for split, info in manifest["splits"].items():
        texts[split] = []
        for shard in info["shards"]:
            blocks = np.load(data_dir(cfg).local() / shard["file"]).astype(np.int64)
            ids = np.concatenate([blocks[:, :-1].ravel(), blocks[-1:, -1]]).tolist()
            docs, current = [], []
            for i in ids:
                if i == eot:
                    docs.append(tokenizer.decode(current))
                    current = []
                else:
                    current.append(i)
            texts[split] += [d for d in docs + [tokenizer.decode(current)] if d]
    return texts


def held_out_membership(cfg, manifest, corpus) -> dict[str, str]:
    """{file name: split} of every document in the packed splits, named by the one file of the
    planted corpus that begins with its first 200 characters (a play and its copy differ sooner)."""
    files = {p.name: p.read_text() for p in corpus.iterdir()}
    membership = {}
    for split, docs in split_texts(cfg, manifest).items():
        for doc in docs:
            names = [name for name, text in files.items() if text.startswith(doc[:200])]
            assert len(names) == 1 and names[0] not in membership, (split, doc[:200], names)
            membership[names[0]] = split
    return membership


def test_splits_follow_content_across_folders_s3_and_training_seeds(ray_session, s3_server, tmp_path):
    """The same corpus in two folders and on S3, and under another training seed, gives the same
    split membership and byte-identical packed splits; only data.split_seed moves documents."""
    import numpy as np

    endpoint, client = s3_server
    a = planted_corpus(tmp_path / "a" / "corpus")
    shutil.copytree(a, tmp_path / "b" / "somewhere" / "else")
    client.create_bucket(Bucket="splits")
    for path in sorted(a.iterdir()):
        client.put_object(Bucket="splits", Key=f"c/{path.name}", Body=path.read_bytes())
    extra = ["data.val_fraction=0.25", "data.test_fraction=0.15"]
    runs = {"a": config(tmp_path / "a", [str(a)], *extra),
            "b": config(tmp_path / "b", [str(tmp_path / "b" / "somewhere" / "else")], *extra),
            "s3": config(tmp_path / "s3", ["s3://splits/c/"], f"data.s3.endpoint_url={endpoint}", *extra),
            "seed": config(tmp_path / "seed", [str(a)], "seed=7", *extra)}
    manifests = {k: prepare(c, log=Log()) for k, c in runs.items()}
    membership = {k: held_out_membership(c, manifests[k], a) for k, c in runs.items()}
    assert len(membership["a"]) == 14 and {"train", "val", "test"} == set(membership["a"].values())
    blocks = {k: split_blocks(runs[k], manifests[k]) for k in runs}
    for other in ("b", "s3", "seed"):
        assert membership[other] == membership["a"], other
        for split in ("train", "val", "test"):
            assert np.array_equal(blocks[other][split], blocks["a"][split]), (other, split)
    moved = config(tmp_path / "moved", [str(a)], "data.split_seed=1", *extra)
    assert held_out_membership(moved, prepare(moved, log=Log()), a) != membership["a"]


def test_no_held_out_text_appears_in_any_training_block(ray_session, tmp_path):
    """Decode the packed shards: no 80-character window of any validation or test document (nor of
    the near-copies folded into their clusters) occurs in the training text."""
    corpus = planted_corpus(tmp_path / "corpus")
    cfg = config(tmp_path, [str(corpus)], "data.val_fraction=0.25", "data.test_fraction=0.15")
    manifest = prepare(cfg, log=Log())
    texts = split_texts(cfg, manifest)
    train_text = "\n".join(texts["train"])
    membership = held_out_membership(cfg, manifest, corpus)
    held_out = [name for name, split in membership.items() if split != "train"]
    # A cluster's smallest key is kept: "copy_play_NN" for the plays with a planted copy.
    assert any(name.startswith("copy_") for name in held_out), membership
    checked = 0
    for split in ("val", "test"):
        for doc in texts[split]:
            for start in range(0, max(0, len(doc) - 80), 200):
                window = doc[start : start + 80]
                assert window not in train_text, (split, window)
                checked += 1
    assert checked > 20
    # The planted copies of held-out plays (dropped as duplicates) are not in training either.
    for name in held_out:
        base = name.removeprefix("copy_")
        for path in (corpus / base, corpus / f"copy_{base}"):
            if path.exists():
                text = path.read_text()
                for start in range(0, len(text) - 80, 400):
                    window = " ".join(text[start : start + 80].split()[1:-1])  # whole words, any wrapping
                    assert window not in " ".join(train_text.split()), (path.name, window)


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
