"""Cross-validation folds stream the corpus: a document's fold comes from a hash of its duplicate
cluster's key, documents are read one shard at a time, and each fold is packed and scored as the
whole stream would be, without holding the corpus."""

import tracemalloc

import numpy as np
import pytest

from llm_ray.config import load_config
from llm_ray.data import transforms
from llm_ray.data.splits import assign_splits
from llm_ray.eval.cv import fold_of, fold_passes, pack_fold, score_fold

WORDS = ("the king of shadows walks upon a hill and speaks to every mortal heart that listens now while "
         "rivers carry old songs through quiet towns beneath grey winter skies").split()
SEED = 0
THRESHOLDS = (0.2, 0.4)  # split hashes in [0.2, 0.4) are the test split, kept out of every fold


def corpus(shards: int, per_shard: int = 50, words: tuple[int, int] = (250, 350)):
    """A pass over a made-up prepared corpus, one shard at a time, built afresh each pass (as reading
    the shards would): documents come in pairs of near-duplicates that share a cluster."""

    def one_pass():
        for s in range(shards):
            rng = np.random.default_rng(s)
            texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(*words)))) for _ in range(per_shard)]
            keys = [f"doc-{s}-{i}" for i in range(per_shard)]
            yield keys, texts, [f"cluster-{s}-{i // 2}" for i in range(per_shard)]

    return one_pass


def outside_test_split(documents) -> list[tuple[str, str]]:
    """(cluster key, text) of the documents outside the test split, by the splits' own rule."""
    out = []
    for _, texts, clusters in documents():
        splits = assign_splits({"cluster_key": np.array(clusters, dtype=object)}, SEED, *THRESHOLDS)["split"]
        out += [(c, t) for c, t, s in zip(clusters, texts, splits) if s != "test"]
    return out


def cv_config(*overrides):
    return load_config("debug", ["tokenizer.vocab_size=300", *overrides])


def test_folds_are_balanced_and_keep_clusters_whole():
    """Each cluster has one fold, from its key alone; 3000 clusters fall into 3 folds of about 1000
    (binomial spread: about 26); another seed deals them otherwise."""
    clusters = [f"c{i}" for i in range(3000)]
    folds = [fold_of(c, 3, SEED) for c in clusters]
    assert all(abs(n - 1000) < 100 for n in np.bincount(folds, minlength=3)), np.bincount(folds)
    assert folds == [fold_of(c, 3, SEED) for c in clusters]
    assert folds != [fold_of(c, 3, SEED + 1) for c in clusters]
    documents = corpus(4)
    passes = fold_passes(documents, 3, SEED, THRESHOLDS)
    texts = [t for _, t in outside_test_split(documents)]
    seen = [(text, fold) for shard in passes() for text, fold in shard]
    assert [t for t, _ in seen] == texts  # every document outside the test split, once, in corpus order
    cluster_of = {t: c for c, t in outside_test_split(documents)}
    fold_of_cluster = {}
    for text, fold in seen:  # the two documents of a cluster share its fold
        assert fold_of_cluster.setdefault(cluster_of[text], fold) == fold


def read_part(out, manifest, split):
    return np.concatenate([np.load(out / s["file"]) for s in manifest["splits"][split]["shards"]])


def test_a_fold_is_packed_as_its_whole_stream_would_be(tmp_path):
    """Shard by shard, the blocks are those transforms.pack_blocks cuts from all of the part's documents
    at once (blocks straddle the shards), in the format training reads; each fold's validation part
    holds its own documents and its training part all the others outside the test split."""
    import json

    from tokenizers import Tokenizer

    from llm_ray.data.tokenizer import eot_id
    from llm_ray.train.data import PackedBlocks

    cfg = cv_config()
    documents = corpus(6)
    passes = fold_passes(documents, 3, SEED, THRESHOLDS)
    outside = len(outside_test_split(documents))
    val_documents = 0
    for fold in range(3):
        out = tmp_path / f"fold-{fold}"
        counts = pack_fold(cfg, passes, fold, out)
        assert counts["train"] + counts["val"] == outside
        val_documents += counts["val"]
        manifest = json.loads((out / "manifest.json").read_text())
        tokenizer = Tokenizer.from_file(str(out / manifest["tokenizer"]))
        parts = {"val": [t for shard in passes() for t, f in shard if f == fold],
                 "train": [t for shard in passes() for t, f in shard if f != fold]}
        for split, texts in parts.items():
            expected, _ = transforms.pack_blocks([tokenizer.encode(t, add_special_tokens=False).ids for t in texts],
                                                 eot_id(tokenizer), cfg.data.block_size)
            blocks = read_part(out, manifest, split)
            assert blocks.dtype == np.uint16 and np.array_equal(blocks, expected), (fold, split)
            assert len(manifest["splits"][split]["shards"]) > 1  # one per documents shard: really streamed
            paths = [out / s["file"] for s in manifest["splits"][split]["shards"]]
            assert len(PackedBlocks(paths)) == manifest["splits"][split]["blocks"] == len(expected)
    assert val_documents == outside  # each document is validation in exactly one fold


def peaks(tmp_path, shards: int) -> tuple[int, int, dict]:
    """Peak traced memory (bytes) of packing fold 0 and of scoring a model on it, and the score."""
    from llm_ray.checkpoint import save_inference
    from llm_ray.config import model_spec
    from llm_ray.model import GPT

    cfg = cv_config("eval.bootstrap_samples=10")
    passes = fold_passes(corpus(shards, words=(100, 160)), 2, SEED, THRESHOLDS)
    out = tmp_path / f"{shards}-shards"
    tracemalloc.start()
    try:
        pack_fold(cfg, passes, 0, out / "data")
        packing = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()  # a model to score with: made outside the measure
        save_inference(out / "checkpoint", GPT(model_spec(cfg)).state_dict(), cfg,
                       (out / "data" / "tokenizer" / "tokenizer.json").read_text(), {"step": 0})
        tracemalloc.start()
        result = score_fold(cfg, str(out / "checkpoint"), passes, 0, log=lambda *_: None)
        scoring = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return packing, scoring, result


@pytest.mark.slow
def test_cv_holds_one_shard_not_the_corpus(tmp_path):
    """Packing and scoring a fold of a corpus 4x larger takes about the same memory (Python objects and
    numpy arrays, as tracemalloc sees them): what is held is one documents shard at a time."""
    peaks(tmp_path / "warm-up", 1)  # imports and first-call caches: not part of what either size holds
    small_packing, small_scoring, scored = peaks(tmp_path, 4)
    large_packing, large_scoring, _ = peaks(tmp_path, 16)
    assert large_packing < 1.5 * small_packing, (small_packing, large_packing)
    assert large_scoring < 1.5 * small_scoring, (small_scoring, large_scoring)
    fold_0 = [t for shard in fold_passes(corpus(4, words=(100, 160)), 2, SEED, THRESHOLDS)() for t, f in shard
              if f == 0]
    assert scored["documents"] == len(fold_0) and np.isfinite(scored["loss"]["value"])
