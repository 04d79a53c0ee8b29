"""Contamination with 64-bit word n-gram hashes: the hashes, the evaluation index, the plain
map/reduce functions, the chance-collision rate at scale, and the Ray tasks on planted copies."""

import numpy as np
import pytest

from llm_ray.config import EvalConfig
from llm_ray.data import ngrams
from llm_ray.eval import contamination, tasks


def random_words(count: int, vocabulary: list[str], rng) -> str:
    return " ".join(vocabulary[i] for i in rng.integers(0, len(vocabulary), size=count))


def make_vocabulary(size: int, rng) -> list[str]:
    """`size` distinct lowercase words of 6 to 10 letters (over 26^6 possible: nearly all distinct)."""
    letters = rng.integers(ord("a"), ord("z") + 1, size=(size, 10), dtype=np.uint8)
    lengths = rng.integers(6, 11, size=size)
    return sorted({bytes(row[:k]).decode() for row, k in zip(letters, lengths)})


# ---------------------------------------------------------------- the hashes


def test_ngram_hashes_are_distinct_64_bit_and_follow_the_normalized_words():
    text = "The quick brown fox jumps over the lazy dog. " * 3
    h = ngrams.ngram_hashes(text, 3)
    assert h.dtype == np.uint64 and len(h) == 9  # 25 trigrams, repeating with period 9
    assert (np.diff(h) > 0).all()  # sorted, each once
    assert (h > np.uint64(2**32)).any() and h.max() > np.uint64(2**63)  # the whole 64-bit range is used
    assert np.array_equal(ngrams.ngram_hashes(text, 3), h)
    assert np.array_equal(ngrams.ngram_hashes("  THE quick\nbrown FOX jumps over the lazy dog " * 3, 3), h)
    assert not np.array_equal(ngrams.ngram_hashes("a b", 2), ngrams.ngram_hashes("b a", 2))  # order counts
    # Each CJK character is a word of its own, as in deduplication.
    assert np.array_equal(ngrams.ngram_hashes("我爱北京天安门", 2), ngrams.ngram_hashes("我 爱 北 京 天 安 门", 2))
    assert len(ngrams.ngram_hashes("我爱北京天安门", 2)) == 6
    # Fewer words than n: one hash, of all of them.
    assert len(ngrams.ngram_hashes("only four words here", 13)) == 1
    assert len(ngrams.ngram_hashes("  ...  ", 13)) == 0


def test_word_hashes_are_64_bit_blake2b_per_distinct_word():
    import hashlib

    h = ngrams.word_hashes(["to", "be", "or", "not", "to", "be"])
    assert h[0] == h[4] and h[1] == h[5] and len(set(h.tolist())) == 4
    assert int(h[2]) == int.from_bytes(hashlib.blake2b(b"or", digest_size=8).digest(), "little")


def test_partitions_cover_every_hash_once():
    hashes = np.unique(np.random.default_rng(0).integers(0, 2**63, size=1000, dtype=np.uint64) * np.uint64(2))
    parts = ngrams.partition_hashes(hashes, 7)
    assert len(parts) == 7 and np.array_equal(np.sort(np.concatenate(parts)), hashes)
    assert all((p % np.uint64(7) == np.uint64(k)).all() for k, p in enumerate(parts))
    assert min(map(len, parts)) > 100  # the mixed hashes spread evenly (1000 / 7 = 143 on average)
    ids = np.arange(len(hashes))
    for k, (i, h) in enumerate(ngrams.partition_pairs(ids, hashes, 7)):
        assert np.array_equal(hashes[i], h) and np.array_equal(h, parts[k])


# ---------------------------------------------------------------- the evaluation index


def test_overlap_with_names_the_most_covered_evaluation_document():
    rng = np.random.default_rng(1)
    vocabulary = make_vocabulary(5000, rng)
    a, b, c = (random_words(60, vocabulary, rng) for _ in range(3))
    shared = random_words(30, vocabulary, rng)
    evaluation = [a, b + " " + shared, shared + " " + c]  # the 18 n-grams of `shared` are in two documents
    index = ngrams.index_of([ngrams.ngram_hashes(t, 13) for t in evaluation])
    assert list(index.ngrams) == [48, 78, 78] and len(index.hashes) == 48 + 78 + 78 - 18
    assert (np.diff(index.starts) == 2).sum() == 18
    # A training text holding all of a and the shared passage covers a whole, 18 of 78 of the others.
    assert ngrams.overlap_with(index, ngrams.ngram_hashes(a + " " + shared, 13)) == (0, 1.0)
    assert ngrams.overlap_with(index, ngrams.ngram_hashes(shared, 13)) == (1, pytest.approx(18 / 78))  # a tie: first
    assert ngrams.overlap_with(index, ngrams.ngram_hashes(random_words(500, vocabulary, rng), 13)) == (-1, 0.0)
    assert ngrams.overlap_with(index, ngrams.EMPTY) == (-1, 0.0)


def test_plan_rounds_bounds_reduce_memory_and_keeps_map_outputs_out_of_line():
    parts, per_map = contamination.plan_rounds(10**9, 1000)  # a few GB of text in 8 MB shards
    assert parts == 60 and per_map == 1  # 1.7e7 n-grams a reduce; 1e6 / 60 = 17k hashes (133 KB) an output
    parts, per_map = contamination.plan_rounds(2 * 10**10, 10**4)
    assert parts == contamination.MAX_PARTITIONS and 2 * 10**6 * per_map / parts >= contamination.MIN_HASHES_PER_OUTPUT
    assert contamination.plan_rounds(0, 3) == (1, 3) and contamination.plan_rounds(10**5, 0) == (1, 1)


def test_plain_rounds_equal_the_one_process_reference(monkeypatch):
    """Map and reduce as the Ray tasks run them, by hand: three maps, four partitions, several eval chunks."""
    rng = np.random.default_rng(2)
    vocabulary = make_vocabulary(3000, rng)
    train = [random_words(int(rng.integers(50, 200)), vocabulary, rng) for _ in range(30)]
    evaluation = [train[3], " ".join(train[5].split()[:40]) + " " + random_words(80, vocabulary, rng),
                  random_words(100, vocabulary, rng), "", train[7] + " " + train[8]]
    monkeypatch.setattr(contamination, "EVAL_PAIRS_PER_CHUNK", 50)
    collected = contamination.EvalNgrams(13, 4)
    for batch in (evaluation[:2], evaluation[2:4], evaluation[4:]):  # as eval streams them
        collected.add(batch)
    collected.flush()
    assert collected.ngrams.tolist() == [len(ngrams.ngram_hashes(t, 13)) for t in evaluation]
    assert min(len(c) for c in collected.chunks) >= 2
    mapped = [contamination.train_partitions(train[i : i + 10], 13, 4) for i in range(0, 30, 10)]
    hits = np.zeros(len(evaluation), dtype=np.int64)
    for p in range(4):
        ids, counts = contamination.partition_hits(collected.chunks[p], [m[p] for m in mapped])
        hits[ids] += counts
    assert hits[1] == 40 - 12 and hits[2] == hits[3] == 0
    e = EvalConfig(contamination_threshold=0.1)
    got = contamination.report([f"d{i}" for i in range(5)], contamination.overlaps(hits, collected.ngrams), e)
    want = tasks.contamination([(f"d{i}", t) for i, t in enumerate(evaluation)], tasks.ngram_index(train, 13), e)
    assert got == want
    assert got["contaminated"] == 3 and [d["document"] for d in got["listed"]] == ["d0", "d4", "d1"]


# ---------------------------------------------------------------- chance collisions at scale


@pytest.mark.slow
def test_false_positive_share_is_below_one_in_a_million_with_1e7_training_ngrams():
    """1e7 training 13-grams and 1e6 n-grams of unrelated documents, words drawn from 2^18 random
    words: any n-gram found is a chance collision of hashes (a true 13-word match has probability
    2^-234). Expected chance matches with 64-bit hashes: 1e6 * 1e7 / 2^64 = 5e-7 in all, so the share
    is 0. With 32-bit hashes it is about 1e7 / 2^32 = 2.3e-3: truncating the hashes to 32 bits (mix64
    returning x & 0xFFFFFFFF) made this test fail, 2566 of the 1,056,000 n-grams found (2.4e-3)."""
    rng = np.random.default_rng(3)
    vocabulary = make_vocabulary(1 << 18, rng)
    words_per_doc = 100_000
    train = [random_words(words_per_doc, vocabulary, rng) for _ in range(101)]
    mapped = contamination.train_partitions(train, 13, 1)  # the map task's work, as one partition
    del train
    training_ngrams = sum(len(m) for m in mapped)
    assert training_ngrams >= 10**7
    collected = contamination.EvalNgrams(13, 1)
    for _ in range(12):
        collected.add([random_words(words_per_doc // 1000, vocabulary, rng) for _ in range(1000)])  # 88 n-grams each
    collected.flush()
    evaluated = int(collected.ngrams.sum())
    assert evaluated >= 10**6
    ids, counts = contamination.partition_hits(collected.chunks[0], mapped)  # the reduce task's work
    share = counts.sum() / evaluated
    assert share <= 1e-6, f"{counts.sum()} of {evaluated} evaluated n-grams collide with {training_ngrams}"


# ---------------------------------------------------------------- the Ray tasks


def cluster_key(doc_key: str, split: str) -> str:
    """A cluster key for doc_key that puts it in split (train or val) under write_prepared's thresholds."""
    from llm_ray.data.transforms import split_key

    return next(k for i in range(10_000) if (split_key(k := f"{doc_key}-{i}", 0) < 0.5) == (split == "val"))


def write_prepared(root, shards: list[list[tuple[str, str, str | None]]]):
    """A prepared data folder by hand: per shard (doc_key, text, split) rows, split None for a document
    dedup dropped. The split thresholds are (0.5, 0.5): no test split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm_ray.storage import Location

    root, names = Location(str(root)), []
    for n, rows in enumerate(shards):
        names.append(f"part-{n}.parquet")
        kept = [(i, k, split) for i, (k, _, split) in enumerate(rows) if split]
        for folder, table in (("documents", {"doc_key": [k for k, _, _ in rows], "text": [t for _, t, _ in rows]}),
                              ("dedup", {"row": [i for i, _, _ in kept], "doc_key": [k for _, k, _ in kept],
                                         "cluster_key": [cluster_key(k, split) for _, k, split in kept]})):
            buffer = pa.BufferOutputStream()
            pq.write_table(pa.table(table), buffer)
            (root / folder / names[-1]).write_bytes(buffer.getvalue().to_pybytes())
    (root / "documents" / "_stage.json").write_json({"shards": names})
    (root / "manifest.json").write_json({"split_seed": 0, "split_thresholds": [0.5, 0.5],
                                         "splits": {"train": {"document_tokens": 1000}, "val": {}}})
    return root


@pytest.mark.integration
def test_ray_tasks_report_planted_copies_and_nothing_else(ray_session, tmp_path, monkeypatch):
    import ray

    from llm_ray.config import DataConfig
    from llm_ray.data.splits import documents_shards, split_documents, split_rule

    rng = np.random.default_rng(4)
    vocabulary = make_vocabulary(20_000, rng)

    def words(count: int) -> str:
        return random_words(count, vocabulary, rng)

    passage, first, second, held, dropped, before = words(200), words(100), words(200), words(50), words(50), words(300)
    shards = [[("t0", words(300) + " " + passage + " " + words(300), "train"), ("t1", first, "train"),
               ("v0", held, "val"), ("t2", dropped, None)],
              [("t3", before, "train"), ("t4", "five words of training text", "train")],
              [("t5", words(300) + " " + second, "train")]]
    data = write_prepared(tmp_path, shards)
    assert [[k for k, _ in s] for s in split_documents(data, DataConfig(), "val")] == [["v0"], [], []]
    tail = " ".join(before.split()[-150:])
    evaluation = [("copied", passage), ("half", first + " " + words(100)), ("fresh", words(200)), ("held", held),
                  ("dropped", dropped), ("short", "Five words of TRAINING text"), ("across", tail + " " + second)]
    seed, thresholds = split_rule(data, DataConfig())
    split = contamination.TrainingSplit(documents_shards(data), data / "dedup", seed, thresholds, 1000)
    monkeypatch.setattr(contamination, "EVAL_PAIRS_PER_CHUNK", 300)  # several chunks per partition
    collected = contamination.EvalNgrams(13, 3, put=ray.put)
    for batch in (evaluation[:4], evaluation[4:]):
        collected.add([t for _, t in batch])
    hits = contamination.training_hits(split, collected, per_map=1)  # three maps, three partitions
    assert collected.chunks == [[], [], []]  # handed to the check: eval holds no object-store refs after it

    # Every n-gram inside one training document is found; none in val, dropped, fresh or across two documents.
    expected = {"copied": 188, "half": 100 - 12, "fresh": 0, "held": 0, "dropped": 0, "short": 1,
                "across": (150 - 12) + 188}
    assert dict(zip([k for k, _ in evaluation], hits.tolist())) == expected
    assert collected.ngrams.tolist() == [188, 188, 188, 38, 38, 1, 350 - 12]
    e = EvalConfig(contamination_threshold=0.3)
    result = contamination.report([k for k, _ in evaluation], contamination.overlaps(hits, collected.ngrams), e)
    assert [d["document"] for d in result["listed"]] == ["copied", "short", "across", "half"]
    assert result["contaminated"] == 4 and result["share"] == pytest.approx(4 / 7)
