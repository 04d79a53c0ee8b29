"""The data report from hand-built stage records, without Ray: the funnel adds up, every drop reason
is shown, older records (fewer fields) still make a report, and the picture is a PNG of the size asked."""

import copy
import io
import json

import pytest

from llm_ray.data.funnel import cluster_bin_label, funnel, language_shares
from llm_ray.data.report import build_report, write_report
from llm_ray.data.report_figure import _plot_clusters, _plot_languages, plot
from llm_ray.storage import Location

# 1,000 documents read; every number below is chosen by hand so that the expected funnel is literal.
QUALITY_DROPS = {"too_few_words": 50, "symbol_word_ratio": 20, "empty": 5}
DROPS = {**QUALITY_DROPS, "pii": 3, "language": 40, "contamination": 2}
DROP_BYTES = {"too_few_words": 5_000, "symbol_word_ratio": 2_000, "empty": 0, "pii": 3_000, "language": 40_000,
              "contamination": 2_000}


def records() -> tuple[dict, dict, dict, dict]:
    docs = {"files": 12, "failed": [["s3://b/bad.jsonl.gz", "truncated gzip stream"]], "bytes_in": 400_000,
            "docs_in": 1_000, "text_bytes_in": 1_000_000, "docs_out": 880, "bytes_out": 900_000,
            "drops": dict(DROPS), "drop_bytes": dict(DROP_BYTES), "notes": {"invalid_json_line": 7},
            "pii": {"email": 9}, "pii_chars": 180, "pii_docs": 8, "pii_examples": ["mail <EMAIL> now"],
            "languages": {"en": 880, "de": 25, "fr": 10, "und": 5},
            "length_histogram": [0] * 6 + [100, 400, 300, 80] + [0] * 22,
            "contamination_examples": [{"document": "a.jsonl:3", "evaluation_document": "eval.jsonl:9",
                                        "share": 0.87}]}
    dedup = {"docs_in": 880, "docs_out": 800, "exact_duplicates": 30, "near_duplicate_pairs": 48,
             "candidate_edges": 75, "clusters_with_copies": 21, "largest_cluster": 40,
             "cluster_size_histogram": [[2, 15], [3, 4], [5, 1], [9, 0], [17, 0], [33, 1]], "lsh_bands": 16,
             "lsh_rows": 8, "example_pairs": [{"documents": ["a.jsonl:1", "b.jsonl:2"], "estimated_jaccard": 0.93}],
             "exact_duplicate_bytes": 30_000, "bytes_out": 700_000}
    manifest = {"splits": {"train": {"documents": 760, "blocks": 100, "tokens": 25_600},
                           "val": {"documents": 30, "blocks": 4, "tokens": 1_024},
                           "test": {"documents": 10, "blocks": 2, "tokens": 512}},
                "documents": {"train": 760, "val": 30, "test": 10}, "unigram_val_loss": 6.5}
    tok = {"vocab_size": 512, "fertility": 1.4, "bytes_per_token": 3.2}
    return docs, dedup, manifest, tok


def report_of(docs, dedup, manifest, tok) -> dict:
    return build_report(manifest, docs, dedup, tok, {"documents": 1.0, "dedup": 0.5}, 2.0)


def test_funnel_steps_add_up_to_the_records():
    docs, dedup, manifest, _ = records()
    steps = funnel(docs, dedup, manifest)
    assert [(s["step"], s["documents"], s["dropped_documents"], s["reason"]) for s in steps] == [
        ("read", 1_000, 0, None),
        ("after quality rules", 925, 75, "quality rules"),
        ("after PII", 922, 3, "pii"),
        ("after language", 882, 40, "language"),
        ("after contamination", 880, 2, "contamination"),
        ("cleaned text", 880, 0, "cleaning edits"),
        ("after exact dedup", 850, 30, "exact duplicates"),
        ("after near dedup (kept)", 800, 50, "near duplicates"),
        ("splits", 800, 0, "not in a split"),
    ]
    for before, after in zip(steps, steps[1:]):
        assert after["documents"] == before["documents"] - after["dropped_documents"]
    # Bytes: input bytes of the survivors through the filters, then the cleaned text, less the exact copies'
    # 30,000 bytes, then the kept documents' 700,000.
    assert [s["bytes"] for s in steps[:-1]] == [1_000_000, 993_000, 990_000, 950_000, 948_000, 900_000, 870_000,
                                                700_000]
    assert steps[5]["dropped_bytes"] == 48_000
    assert steps[7]["dropped_bytes"] == 170_000 and "bytes_since" not in steps[7]
    assert steps[1]["by_rule"] == {"empty": {"documents": 5, "bytes": 0},
                                   "symbol_word_ratio": {"documents": 20, "bytes": 2_000},
                                   "too_few_words": {"documents": 50, "bytes": 5_000}}
    assert steps[-1]["splits"] == {"train": 760, "val": 30, "test": 10}


def test_a_record_that_disagrees_with_itself_shows_the_gap():
    docs, dedup, manifest, _ = records()
    docs["docs_out"] = 870  # 10 fewer than the drops explain
    steps = funnel(docs, dedup, manifest)
    gap = next(s for s in steps if s["step"] == "unaccounted")
    assert gap["dropped_documents"] == 10 and gap["documents"] == 870


def test_every_drop_reason_is_in_the_table_json_and_markdown(tmp_path):
    report = report_of(*records())
    write_report(report, Location.parse(tmp_path))
    written = json.loads((tmp_path / "prepare_report.json").read_text())
    md = (tmp_path / "prepare_report.md").read_text()
    in_json = set(written["funnel"][1]["by_rule"]) | {s["reason"] for s in written["funnel"]}
    for reason in DROPS:
        assert reason in report["table"] and reason in md, reason
        assert reason in in_json, reason
    for reason in ("quality rules", "exact duplicates", "near duplicates"):
        assert reason in report["table"]
    table = report["table"]
    assert "language: -40 docs / -40.0 kB" in table
    assert "near duplicates: -50 docs / -170.0 kB" in table
    assert "of 75 candidate edges" in table and "2: 15, 3-4: 4, 5-8: 1, 33-64: 1" in table
    assert "languages: en 95.7%, de 2.7%, fr 1.1%, und 0.5%" in table
    assert written["dedup"]["candidate_edges"] == 75
    assert written["dedup"]["cluster_size_histogram"][0] == [2, 15]
    assert written["languages"] == {"en": 880, "de": 25, "fr": 10, "und": 5}
    assert written["contamination_examples"][0]["evaluation_document"] == "eval.jsonl:9"
    assert "| a.jsonl:3 | eval.jsonl:9 | 0.87 |" in md
    after = {s["step"]: s["documents"] for s in written["funnel"]}
    assert after["cleaned text"] == 880 and after["after near dedup (kept)"] == 800


@pytest.mark.parametrize("demo", [False, True])
def test_the_picture_is_a_png_of_the_size_asked(tmp_path, demo):
    docs, dedup, manifest, tok = records()
    if demo:  # the demo: 16 documents, nothing dropped, one validation document
        docs.update(docs_in=16, docs_out=16, drops={}, drop_bytes={}, languages={}, contamination_examples=[])
        dedup.update(docs_in=16, docs_out=16, exact_duplicates=0, clusters_with_copies=0, largest_cluster=1,
                     cluster_size_histogram=[])
        manifest["documents"] = {"train": 15, "val": 1, "test": 0}
    write_report(report_of(docs, dedup, manifest, tok), Location.parse(tmp_path))
    from PIL import Image

    with Image.open(io.BytesIO((tmp_path / "prepare_report.png").read_bytes())) as image:
        assert image.format == "PNG" and image.size == (12 * 90, 8 * 90)


def panel_text(draw, *args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    try:
        draw(ax, *args)
        return " ".join(t.get_text() for t in ax.texts) + " " + ax.get_title()
    finally:
        plt.close(fig)


def test_empty_panels_say_why_in_words():
    assert "cleaning.languages not set" in panel_text(_plot_languages, {}, 0)
    assert "no duplicate clusters" in panel_text(_plot_clusters, [], 1)
    assert "no duplicate clusters" not in panel_text(_plot_clusters, [[2, 3]], 2)
    assert "cleaning.languages" not in panel_text(_plot_languages, {"en": 3}, 0)


def test_language_shares_keep_the_top_and_sum_the_rest():
    languages = {code: 10 - i for i, code in enumerate("abcdefghij")}  # 10 languages, 55 documents
    shares = language_shares(languages)
    assert [code for code, _, _ in shares] == list("abcdefgh") + ["other"]
    assert shares[-1][1] == 2 + 1 and sum(n for _, n, _ in shares) == 55
    assert shares[0][2] == pytest.approx(10 / 55)
    assert language_shares({}) == []


def test_cluster_bins_are_named_by_their_range():
    assert [cluster_bin_label(lo) for lo in (2, 3, 5, 9, 16_385)] == ["2", "3-4", "5-8", "9-16", "16,385-32,768"]


def test_plot_does_not_change_the_report():
    report = report_of(*records())
    before = copy.deepcopy(report)
    assert plot(report)[:4] == b"\x89PNG"
    assert report == before
