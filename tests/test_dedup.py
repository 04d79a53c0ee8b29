import random
import re

import numpy as np
import pytest

from llm_ray.config import DedupConfig
from llm_ray.data import dedup
from tests.conftest import CORPUS

TEXTS = [p.read_text() for p in sorted(CORPUS.glob("play_*.txt"))]


def find_clusters(keys: np.ndarray, exact: np.ndarray, signatures: np.ndarray, cfg) -> dict:
    """Clusters as the former driver-side dedup found them (every pair in memory): the reference the
    distributed rounds (llm_ray.data.dedup_stage) must agree with."""
    pairs, exact_pairs, first = [], 0, {}
    if cfg.exact:
        for i, h in enumerate(exact):
            if h in first:
                pairs.append((first[h], i))
                exact_pairs += 1
            else:
                first[h] = i
    bands, rows = dedup.lsh_params(cfg.threshold, cfg.num_perm)
    near = dedup.near_duplicate_pairs(signatures, cfg.threshold, bands, rows) if cfg.near else []
    return {"labels": dedup.clusters(len(keys), pairs + near), "near_pairs": near, "exact_pairs": exact_pairs}


def change_words(text: str, fraction: float, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), int(len(words) * fraction)):
        words[i] = "x" + words[i][::-1]
    return " ".join(words)


def rewrap(text: str, width: int = 37) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) > width:
            lines.append(line)
            line = ""
        line = (line + " " + w).strip()
    return "\n".join(lines + [line])


def old_spelling(text: str) -> str:
    """A First-Folio-like respelling: u/v and i/j swaps, -ie endings, doubled consonants."""
    text = re.sub(r"\bu", "v", text)
    text = re.sub(r"(?<=\w)v(?=\w)", "u", text)
    text = re.sub(r"y\b", "ie", text)
    text = re.sub(r"\bI\b", "J", text)
    text = re.sub(r"(?<=\w)e\b", "", text)
    text = re.sub(r"(?<=[aeiou])s\b", "sse", text)
    return text


def signatures(texts, cfg=DedupConfig()):
    a, b = dedup.permutations(cfg.num_perm, cfg.seed)
    return np.stack([dedup.minhash(dedup.shingle_hashes(t, cfg.shingle, cfg.ngram), a, b) for t in texts])


def exact_jaccard(x: str, y: str, cfg=DedupConfig()) -> float:
    sx = set(dedup.shingle_hashes(x, cfg.shingle, cfg.ngram).tolist())
    sy = set(dedup.shingle_hashes(y, cfg.shingle, cfg.ngram).tolist())
    return len(sx & sy) / max(1, len(sx | sy))


def test_minhash_estimates_jaccard():
    pairs = [(TEXTS[0], change_words(TEXTS[0], f, s)) for f, s in ((0.01, 1), (0.03, 2), (0.1, 3), (0.3, 4))]
    for x, y in pairs:
        sig = signatures([x, y])
        estimate = np.mean(sig[0] == sig[1])
        assert estimate == pytest.approx(exact_jaccard(x, y), abs=0.12)


def test_exact_hash_ignores_case_and_whitespace():
    assert dedup.exact_hash("Hello   World\n") == dedup.exact_hash("hello world")
    assert dedup.exact_hash("Hello World") != dedup.exact_hash("Hello Word")


def test_cjk_shingles_are_characters():
    units = dedup.shingle_units("床前明月光，疑是地上霜。", "word")
    assert units[:5] == ["床", "前", "明", "月", "光"]


def test_dedup_contamination_and_the_quality_rules_count_the_same_words():
    """One definition of a word (text_units.words): an inner apostrophe joins, an underscore splits,
    each CJK character (kana's prolonged-sound mark too) is a word. Counted by hand: 8 words."""
    from llm_ray.config import CleaningConfig
    from llm_ray.data import ngrams
    from llm_ray.data.clean import quality_reason

    text = "Don't snake_case: 東京タワー!"
    expected = ["don't", "snake", "case", "東", "京", "タ", "ワ", "ー"]
    assert dedup.shingle_units(text, "word") == expected
    # The quality rules see the same count: 8 words pass min_words=8 and fail min_words=9.
    loose = dict(max_symbol_word_ratio=1.0, min_mean_word_length=0, max_mean_word_length=100,
                 max_duplicate_line_fraction=1.0)
    assert quality_reason(text, CleaningConfig(min_words=9, **loose)) == "too_few_words"
    assert quality_reason(text, CleaningConfig(min_words=8, **loose)) != "too_few_words"
    # Contamination's n-grams are n consecutive of these words: 8 words give 8 - 3 + 1 trigrams.
    assert len(ngrams.ngram_hashes(text, 3)) == 6


def test_lsh_parameters_fit_the_signature():
    for threshold in (0.3, 0.5, 0.8):
        bands, rows = dedup.lsh_params(threshold, 128)
        assert bands * rows <= 128
        # The S-curve's steepest point sits near the threshold.
        assert abs((1 / bands) ** (1 / rows) - threshold) < 0.15


def test_planted_near_duplicates_are_caught_and_two_editions_are_not():
    cfg = DedupConfig()
    base = TEXTS[:10]
    planted = {
        "edited": change_words(base[0], 0.03, seed=7),  # ~3% of words changed
        "rewrapped": rewrap(base[1]),
        "new_header": "THE TRAGEDY, printed from the second quarto, 1604.\n\n" + base[2],
        "edited_copy_of_edited": change_words(change_words(base[0], 0.03, seed=7), 0.02, seed=8),
    }
    edition = old_spelling(base[3])
    assert exact_jaccard(base[3], edition) < 0.3  # a different edition, not a copy
    texts = base + list(planted.values()) + [edition]
    keys = np.array([f"doc{i:02d}" for i in range(len(texts))])
    exact = np.array([dedup.exact_hash(t) for t in texts])
    found = find_clusters(keys, exact, signatures(texts, cfg), cfg)
    labels = found["labels"]
    assert labels[10] == labels[0] and labels[13] == labels[0]  # edited copies, transitively one cluster
    assert labels[11] == labels[1] and labels[12] == labels[2]
    assert labels[14] == 14  # the other edition keeps its own cluster
    assert len(set(labels.tolist())) == 11  # nothing else merged
    assert found["exact_pairs"] == 1  # the re-wrapped copy: whitespace is normalized away
    # Near dedup alone catches it too.
    near_only = find_clusters(keys, exact, signatures(texts, cfg), cfg.model_copy(update={"exact": False}))
    assert near_only["labels"].tolist() == labels.tolist()


def test_rewrapped_copy_is_an_exact_duplicate_after_normalization():
    assert dedup.exact_hash(rewrap(TEXTS[1])) == dedup.exact_hash(TEXTS[1].replace("\n", " "))


def test_clusters_are_connected_components_with_smallest_representative():
    labels = dedup.clusters(6, [(4, 5), (1, 4), (2, 3)])
    assert labels.tolist() == [0, 1, 2, 2, 1, 1]


# ------------------------------------------------------------- the distributed rounds' plain functions


def test_exact_groups_keep_the_first_document_and_count_group_sizes():
    from llm_ray.data.dedup_stage import exact_groups, hash_words

    words = hash_words([dedup.exact_hash(t) for t in ["a b", "c", "A  b", "a b", "d"]])
    rows = np.concatenate([words, np.arange(10, 15, dtype=np.uint64)[:, None]], axis=1)[::-1]  # order given
    copies, sizes = exact_groups(rows)
    assert sorted(map(tuple, copies.tolist())) == [(12, 10), (13, 10)]  # "A  b" and "a b" copy document 10
    assert sizes.tolist() == [[10, 3]]


def test_star_edges_link_each_bucket_member_to_the_smallest_id_once():
    from llm_ray.data.dedup_stage import star_edges

    rows = np.array([[7, 3], [7, 1], [9, 4], [7, 2], [9, 5], [8, 6], [5, 1], [5, 3]], dtype=np.uint64)
    # Bucket 7 = {1, 2, 3}: (1, 2) and (1, 3), no (2, 3) (components make it transitive); (1, 3) also
    # comes from bucket 5 and counts once; 6 is alone.
    assert star_edges(rows).tolist() == [[1, 2], [1, 3], [4, 5]]


def test_components_pick_the_first_document_and_the_smallest_hash():
    from llm_ray.data.dedup_stage import components

    edges = np.array([[4, 9], [2, 4], [5, 6]])
    hashes = np.array([[2, 0, 7], [4, 0, 3], [9, 1, 0], [5, 0, 1], [6, 0, 2]], dtype=np.uint64)
    found = components(edges, hashes, group_sizes=np.array([[4, 3], [7, 2]]))
    assert found["nodes"].tolist() == [2, 4, 5, 6, 9]
    assert found["rep"].tolist() == [2, 2, 5, 5, 2]  # 2-4-9 chained; 5-6
    assert found["key"].tolist() == [[0, 3], [0, 3], [0, 1], [0, 1], [0, 3]]
    assert sorted(found["sizes"].tolist()) == [2, 5]  # document 4 stands for an exact group of 3


def above(u: float) -> float:
    """The smallest float above u: where a threshold goes to put a split key u below it."""
    return float(np.nextafter(u, 1))


# (test_fraction, split keys u of the clusters, (val, val + test) thresholds), val_fraction 0.2, worked by hand.
SPLIT_CASES = [
    (0.0, [0.1, 0.5, 0.9], (0.2, 0.2)),  # 0.1 is below 0.2: the thresholds stay put
    (0.0, [0.5, 0.6, 0.9], (above(0.5), above(0.5))),  # nothing below 0.2: val moves just past 0.5
    (0.3, [0.1, 0.3, 0.9], (0.2, 0.5)),  # 0.3 falls in [0.2, 0.5): test is not empty
    (0.3, [0.1, 0.6, 0.9], (0.2, above(0.6))),  # nothing in [0.2, 0.5): test moves just past 0.6
    (0.3, [0.5, 0.9, 0.95], (above(0.5), above(0.9))),  # val moves past 0.5, then test past the next, 0.9
    (0.3, [0.5, 0.6, 0.95], (above(0.5), above(0.5) + 0.3)),  # val moves; 0.6 is already in test
]
SPLIT_ERRORS = [
    (0.0, [0.5], "1 distinct document(s) after dedup; at least 2 are needed"),
    (0.3, [0.1, 0.9], "2 distinct document(s) after dedup; at least 3 are needed"),
    (0.0, [0.05, 0.1], "every one of the 2 distinct documents fell into a held-out split"),
    (0.3, [0.1, 0.3, 0.45], "every one of the 3 distinct documents fell into a held-out split"),
]


def shardings(keys: list[str]) -> list[list[list[str]]]:
    """Ways the cluster keys may lie across shards: all in one, one each (with an empty shard), reversed."""
    return [[keys], [[k] for k in keys] + [[]], [[k] for k in reversed(keys)], [keys[1:], keys[:1]]]


@pytest.mark.parametrize("test_fraction, u, expected", SPLIT_CASES)
def test_split_thresholds_keep_every_split_non_empty(monkeypatch, test_fraction, u, expected):
    from llm_ray.config import DataConfig
    from llm_ray.data import transforms
    from llm_ray.data.dedup_stage import merge_summaries, split_summary
    from llm_ray.data.splits import split_thresholds, thresholds_from_summary

    monkeypatch.setattr(transforms, "split_key", lambda key, seed: float(key))  # a cluster key is its u
    data = DataConfig(val_fraction=0.2, test_fraction=test_fraction)
    keys = [repr(x) for x in u]
    assert split_thresholds(keys, data) == expected
    for shards in shardings(keys):
        parts = [split_summary(shard, data.split_seed, data.val_fraction) for shard in shards]
        assert thresholds_from_summary(merge_summaries(parts), data) == expected, shards


@pytest.mark.parametrize("test_fraction, u, message", SPLIT_ERRORS)
def test_split_thresholds_fail_when_a_split_must_be_empty(monkeypatch, test_fraction, u, message):
    from llm_ray.config import DataConfig
    from llm_ray.data import transforms
    from llm_ray.data.dedup_stage import merge_summaries, split_summary
    from llm_ray.data.errors import PrepareError
    from llm_ray.data.splits import split_thresholds, thresholds_from_summary

    monkeypatch.setattr(transforms, "split_key", lambda key, seed: float(key))
    data = DataConfig(val_fraction=0.2, test_fraction=test_fraction)
    keys = [repr(x) for x in u]
    with pytest.raises(PrepareError, match=re.escape(message)):
        split_thresholds(keys, data)
    for shards in shardings(keys):
        parts = [split_summary(shard, data.split_seed, data.val_fraction) for shard in shards]
        with pytest.raises(PrepareError, match=re.escape(message)):
            thresholds_from_summary(merge_summaries(parts), data)


@pytest.mark.parametrize("test_fraction", [0.0, 0.3])
def test_split_thresholds_from_shard_summaries_equal_those_of_all_keys(test_fraction):
    """On the real split hash: the merged shard summaries give the thresholds (or the error) of all keys
    at once, and those thresholds leave a key in every requested split."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from llm_ray.config import DataConfig
    from llm_ray.data import transforms
    from llm_ray.data.dedup_stage import merge_summaries, split_summary
    from llm_ray.data.errors import PrepareError
    from llm_ray.data.splits import split_thresholds, thresholds_from_summary

    data = DataConfig(val_fraction=0.2, test_fraction=test_fraction)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.lists(st.text(min_size=1, max_size=6), max_size=6), min_size=1, max_size=4))
    def check(shards):
        keys = sorted({k for shard in shards for k in shard})
        seen, parts = set(), []
        for shard in shards:  # each key in one shard, as cluster keys are
            mine = [k for k in dict.fromkeys(shard) if k not in seen]
            seen.update(mine)
            parts.append(split_summary(mine, data.split_seed, data.val_fraction))
        try:
            expected = split_thresholds(keys, data)
        except PrepareError as e:
            with pytest.raises(PrepareError) as merged:
                thresholds_from_summary(merge_summaries(parts), data)
            assert str(merged.value) == str(e)
            return
        assert thresholds_from_summary(merge_summaries(parts), data) == expected
        val_t, test_t = expected
        u = np.array([transforms.split_key(k, data.split_seed) for k in keys])
        assert np.any(u < val_t) and np.any(u >= test_t), (u, expected)
        assert val_t >= data.val_fraction and test_t >= val_t + data.test_fraction
        if test_fraction:
            assert np.any((u >= val_t) & (u < test_t)), (u, expected)

    check()
