import random
import re

import numpy as np
import pytest

from llm_ray.config import DedupConfig
from llm_ray.data import dedup
from llm_ray.data.prepare import find_clusters
from tests.conftest import CORPUS

TEXTS = [p.read_text() for p in sorted(CORPUS.glob("play_*.txt"))]


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
    return dedup.jaccard(sx, sy)


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
