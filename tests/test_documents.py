"""The documents stage on real crawl shapes: one big .jsonl.zst streamed in bounded memory and
cleaned on every core, chunk-level resume, decontamination and the language filter."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_ray.config import load_config
from llm_ray.data import stages
from llm_ray.data.documents import clean_documents, documents_key
from llm_ray.data.prepare import data_dir, prepare
from llm_ray.data.sources import list_sources
from tests.test_prepare import Log

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VOCAB = np.array([f"w{i:04d}x" for i in range(5000)])


def write_crawl(path, mb: float, seed: int = 0) -> int:
    """A .jsonl.zst of about mb MB of distinct random-word documents (~2 KB each); returns the count."""
    rng = np.random.default_rng(seed)
    count = int(mb * 1e6 / 2000)
    with pa.output_stream(str(path), compression="zstd") as out:
        for start in range(0, count, 1000):
            words = VOCAB[rng.integers(0, len(VOCAB), size=(min(1000, count - start), 300))]
            out.write("".join(json.dumps({"text": " ".join(row), "id": start + i}) + "\n"
                              for i, row in enumerate(words)).encode())
    return count


def stage_config(tmp_path, source, *overrides):
    # Cleaning and signatures off: this measures the reading and chunking, not the rules.
    return load_config("debug", [f"output_dir={tmp_path}", f"data.sources=[{source}]", "data.max_files=null",
                                 "cleaning.enabled=false", "dedup.near=false", *overrides])


def documents_stage(cfg, files, out, log):
    """The documents stage as prepare runs it: through the stage runner, skipped when up to date."""
    eval_sets = list_sources(cfg.data.decontaminate, cfg.data, "data.decontaminate") if cfg.data.decontaminate else []
    return stages.run("documents", out, documents_key(cfg, files, eval_sets),
                      lambda folder, key: clean_documents(cfg, files, eval_sets, folder, key, log), log)


def run_stage(cfg):
    files = list_sources(cfg.data.sources, cfg.data)
    return documents_stage(cfg, files, data_dir(cfg) / "documents", Log())


def test_one_big_file_streams_in_bounded_memory_on_every_core(ray_session, tmp_path):
    small, big = tmp_path / "small.jsonl.zst", tmp_path / "big.jsonl.zst"
    n_small, n_big = write_crawl(small, 10, seed=1), write_crawl(big, 60, seed=2)
    records = {}
    for name, path in (("small", small), ("big", big)):
        records[name] = run_stage(stage_config(tmp_path / name, path, "data.mb_per_task=4"))
    assert records["small"]["docs_in"] == records["small"]["docs_out"] == n_small
    assert records["big"]["docs_in"] == records["big"]["docs_out"] == n_big
    assert len(records["big"]["shards"]) >= 15  # one file, many shards: 60 MB in 4 MB chunks
    # Every document once, in file order, across the shards.
    docs = data_dir(stage_config(tmp_path / "big", big)) / "documents"
    keys = [k for s in records["big"]["shards"] for k in pq.read_table(str(docs / s), columns=["doc_key"])
            .column("doc_key").to_pylist()]
    assert [int(k.rsplit(":", 1)[1]) for k in keys] == list(range(1, n_big + 1))
    # The memory the reading task needs, and a cleaning task's peak, do not follow the file (6x larger).
    # (A reader runs in a fresh process, whose start differs by tens of MB from run to run: what it
    # added is the figure; the old reader held the whole file, 5.7 times its size.)
    small_peaks, big_peaks = records["small"], records["big"]
    assert big_peaks["peak_growth_bytes"]["read_group"] < 1.3 * small_peaks["peak_growth_bytes"]["read_group"], \
        (small_peaks["peak_growth_bytes"], big_peaks["peak_growth_bytes"])
    assert big_peaks["peak_rss_bytes"]["clean_chunk"] < 1.3 * small_peaks["peak_rss_bytes"]["clean_chunk"], \
        (small_peaks["peak_rss_bytes"], big_peaks["peak_rss_bytes"])
    # One file keeps both cores busy: cleaning tasks of its chunks ran at the same time.
    spans = sorted(json.loads((docs / s).with_suffix(".json").read_text())["ran"] for s in records["big"]["shards"])
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans


def test_an_interrupted_stage_reuses_finished_chunks(ray_session, tmp_path):
    path = tmp_path / "crawl.jsonl.zst"
    n = write_crawl(path, 3)
    cfg = stage_config(tmp_path / "out", path, "data.mb_per_task=0.5")
    first = run_stage(cfg)
    docs = data_dir(cfg).local() / "documents"
    record = json.loads((docs / "_stage.json").read_text())
    (docs / "_stage.json").write_text(json.dumps({"key": record["key"], "complete": False}))
    victim = docs / first["shards"][2]
    victim.unlink()
    victim.with_suffix(".json").unlink()
    next(docs.glob("group-*.json")).unlink()
    again = run_stage(cfg)
    assert again["chunks"] == {"cleaned": 1, "reused": len(first["shards"]) - 1}
    assert again["shards"] == first["shards"] and again["docs_out"] == first["docs_out"] == n


def test_decontamination_drops_planted_evaluation_passages(ray_session, tmp_path):
    rng = np.random.default_rng(5)
    passages = [" ".join(VOCAB[rng.integers(0, len(VOCAB), 120)]) for _ in range(4)]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "bench.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    train = [" ".join(VOCAB[rng.integers(0, len(VOCAB), 400)]) for _ in range(30)]
    planted = {3: passages[0], 11: passages[1][: len(passages[1]) // 3], 17: passages[2]}  # 11: a third only
    for i, passage in planted.items():
        train[i] = train[i][:1000] + " " + passage + " " + train[i][1000:]
    (corpus / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    cfg = stage_config(tmp_path / "out", corpus, f"data.decontaminate=[{tmp_path / 'eval'}]",
                       "data.decontaminate_threshold=0.5")
    record = run_stage(cfg)
    assert record["drops"] == {"contamination": 2}  # the whole passages; a third of one stays
    dropped = {e["document"].rsplit(":", 1)[1] for e in record["contamination_examples"]}
    assert dropped == {"4", "18"}  # line numbers of documents 3 and 17
    assert all(e["share"] == 1.0 and e["evaluation_document"].endswith(("bench.jsonl:1", "bench.jsonl:3"))
               for e in record["contamination_examples"])
    without = run_stage(stage_config(tmp_path / "plain", corpus))
    assert without["docs_out"] == 30 and not without["drops"]
    lower = run_stage(stage_config(tmp_path / "lower", corpus, f"data.decontaminate=[{tmp_path / 'eval'}]",
                                   "data.decontaminate_threshold=0.25"))
    assert lower["drops"] == {"contamination": 3}  # the document holding a third of a passage too
    # The evaluation sets are part of the stage key: a changed set reruns the stage.
    (tmp_path / "eval" / "bench.jsonl").write_text(json.dumps({"text": passages[3]}) + "\n")
    log = Log()
    files = list_sources(cfg.data.sources, cfg.data)
    rerun = documents_stage(cfg, files, data_dir(cfg) / "documents", log)
    assert not log.has("up to date") and rerun["drops"] == {}


def test_language_filter_through_prepare(ray_session, tmp_path):
    from tests.test_language import TEXTS as SAMPLES  # prose per language, checked there against langid

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [(lang, " ".join([text] * 12)) for lang, text in SAMPLES.items() for _ in range(3)]
    (corpus / "mixed.jsonl").write_text("".join(json.dumps({"text": t, "lang": lang}) + "\n" for lang, t in rows))
    cfg = load_config("debug", [f"output_dir={tmp_path / 'out'}", f"data.sources=[{corpus}]", "data.max_files=null",
                                "cleaning.languages=[en,zh]", "cleaning.max_duplicate_line_fraction=1",
                                "cleaning.max_top_2gram_fraction=1", "cleaning.max_duplicate_5gram_fraction=1",
                                "dedup.exact=false", "dedup.near=false", "data.val_fraction=0.3",
                                "data.block_size=16", "tokenizer.vocab_size=300"])
    prepare(cfg, log=Log())
    record = json.loads((data_dir(cfg).local() / "documents" / "_stage.json").read_text())
    assert record["languages"] == {lang: 3 for lang in SAMPLES}
    assert record["drops"] == {"language": 3 * (len(SAMPLES) - 2)}
    report = json.loads((data_dir(cfg).local() / "prepare_report.json").read_text())
    assert "language" in json.dumps(report)


def test_a_finished_chunk_is_reused_only_for_the_same_documents(tmp_path):
    """A file that broke mid-stream in one run shifts the chunks after it in the next: an old shard at the
    same position must not stand in for different documents."""
    from llm_ray.config import CleaningConfig, DedupConfig
    from llm_ray.data.decontaminate import Screens
    from llm_ray.data.documents import _finished_chunk, clean_chunk
    from llm_ray.storage import Location

    shard = Location(str(tmp_path / "part-x-00000.parquet"))
    chunk = [(f"f.jsonl:{i}", " ".join(["word"] * 60) + f" {i}") for i in range(1, 6)]
    assert _finished_chunk(shard, chunk) is None
    clean_chunk(chunk, CleaningConfig(enabled=False), DedupConfig(near=False), Screens(), shard)
    assert _finished_chunk(shard, chunk)["docs_out"] == 5
    assert _finished_chunk(shard, chunk[1:] + [("f.jsonl:6", "another")]) is None  # shifted by one
    assert _finished_chunk(shard, chunk[:4]) is None  # cut short
