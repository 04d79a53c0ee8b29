"""Evaluation metrics and the document scorer on small hand-checked cases (no Ray)."""

import math

import numpy as np
import pytest
import torch

from llm_ray.config import EvalConfig, load_config, model_spec
from llm_ray.data import ngrams
from llm_ray.data.tokenizer import train_bpe
from llm_ray.eval import metrics, tasks
from llm_ray.eval.scoring import DocumentScorer, windows
from llm_ray.model import GPT
from tests.conftest import CORPUS

TEXTS = [p.read_text() for p in sorted(CORPUS.glob("play_*.txt"))]


def test_loss_perplexity_and_bits_per_byte_by_hand():
    nll, tokens, n_bytes = np.array([2.0, 4.0]), np.array([1, 3]), np.array([2, 4])
    assert metrics.mean_loss(nll, tokens) == 1.5  # (2 + 4) nats over 4 tokens
    assert metrics.bits_per_byte(nll, n_bytes) == pytest.approx(6 / math.log(2) / 6)
    s = metrics.summarize(nll, tokens, n_bytes, samples=200, seed=0)
    assert s["perplexity"]["value"] == pytest.approx(math.exp(1.5))
    lo, hi = s["loss"]["ci95"]
    assert 1.0 <= lo <= 1.5 <= hi <= 2.0  # every resample's ratio lies between the documents' own losses


def test_bootstrap_interval_covers_the_true_ratio_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true_loss, covered, trials = 3.0, 0, 300
    for trial in range(trials):
        tokens = rng.integers(20, 400, size=40)
        nll = rng.gamma(shape=tokens * 4.0, scale=true_loss / 4.0)  # mean true_loss per token, noisy per document
        lo, hi = metrics.bootstrap_ratio_ci(nll, tokens, samples=400, seed=trial)
        covered += lo <= true_loss <= hi
    assert 0.90 <= covered / trials <= 0.99, covered / trials


def test_bleu_and_rouge_match_the_libraries_documented_values():
    # sacrebleu's README: BLEU = 48.53 for these three sentences against two reference streams.
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
            ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    assert metrics.bleu(hyps, refs) == pytest.approx(48.53, abs=0.01)
    assert metrics.bleu(hyps, hyps) == pytest.approx(100.0)
    # rouge-score's README (with stemming): ROUGE-1 F 0.70588, ROUGE-L F 0.58823; ROUGE-2 by hand:
    # 2 shared bigrams of 7 predicted and 8 reference ones, F = 4/15.
    r = metrics.rouge(["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"])
    assert r["rouge1"] == pytest.approx(0.70588, abs=1e-4)
    assert r["rougeL"] == pytest.approx(0.58823, abs=1e-4)
    assert r["rouge2"] == pytest.approx(4 / 15, abs=1e-4)


@pytest.mark.parametrize("n, context, stride", [(1, 8, 4), (8, 8, 4), (9, 8, 4), (100, 8, 3), (57, 16, 16),
                                                (40, 8, 1)])
def test_every_token_is_scored_exactly_once_with_enough_context(n, context, stride):
    scored = np.zeros(n, dtype=int)
    for begin, end, first in windows(n, context, stride):
        assert end - begin <= context and begin <= first <= end
        scored[first:end] += 1
        if begin > 0:  # tokens scored in later windows have at least context - stride tokens before them
            assert first - begin >= context - stride
    assert (scored == 1).all()
    with pytest.raises(ValueError, match="stride"):
        windows(n, context, context + 1)


@pytest.fixture(scope="module")
def small_model():
    cfg = load_config("debug", ["tokenizer.vocab_size=300"])
    tokenizer = train_bpe(TEXTS, vocab_size=300, min_frequency=2, sample_bytes=100_000)
    torch.manual_seed(0)
    return GPT(model_spec(cfg)).eval(), tokenizer


def full_context_nll(model, tokenizer, text):
    from llm_ray.data.tokenizer import eot_id

    seq = torch.tensor([[eot_id(tokenizer)] + tokenizer.encode(text, add_special_tokens=False).ids])
    with torch.no_grad():
        logits, _ = model(seq[:, :-1])
    return torch.nn.functional.cross_entropy(logits[0].double(), seq[0, 1:], reduction="sum").item()


def test_sliding_window_equals_full_context_when_the_text_fits(small_model):
    model, tokenizer = small_model
    texts = ["To be, or not to be.", "Shall I compare thee to a summer's day? Thou art more lovely."]
    assert all(len(tokenizer.encode(t).ids) < model.spec.context_length for t in texts)
    out = DocumentScorer(model, tokenizer, stride=8, batch_size=4).score(texts)
    for i, text in enumerate(texts):
        assert out["nll_sum"][i] == pytest.approx(full_context_nll(model, tokenizer, text), rel=1e-5)
        assert out["tokens"][i] == len(tokenizer.encode(text).ids) and out["bytes"][i] == len(text.encode())
        assert out["position_count"][i].sum() == out["tokens"][i]


def test_long_documents_score_every_token_and_batching_changes_nothing(small_model):
    model, tokenizer = small_model
    texts = [TEXTS[0][:3000], TEXTS[1][:500], "Short."]
    together = DocumentScorer(model, tokenizer, stride=16, batch_size=5).score(texts)
    assert (together["position_count"].sum(axis=1) == together["tokens"]).all()
    assert together["tokens"][0] > 2 * model.spec.context_length
    for i, text in enumerate(texts):
        alone = DocumentScorer(model, tokenizer, stride=16, batch_size=1).score([text])
        assert alone["nll_sum"][0] == pytest.approx(together["nll_sum"][i], rel=1e-6)
    # A window as wide as the context and no overlap scores the same tokens, with less context.
    disjoint = DocumentScorer(model, tokenizer, stride=model.spec.context_length).score(texts)
    assert (disjoint["tokens"] == together["tokens"]).all()


def test_contamination_finds_copied_documents():
    """The one-process reference, and the plain functions the Ray tasks run (two maps, three partitions)."""
    from llm_ray.eval import contamination

    index = tasks.ngram_index(TEXTS[:5], 13)
    docs = [("copied", TEXTS[2]), ("fresh", TEXTS[9]), ("half", TEXTS[3][: len(TEXTS[3]) // 2] + TEXTS[10])]
    e = EvalConfig(contamination_threshold=0.1)
    result = tasks.contamination(docs, index, e)
    assert result["contaminated"] == 2 and result["share"] == pytest.approx(2 / 3)
    assert [d["document"] for d in result["listed"]] == ["copied", "half"]
    assert result["listed"][0]["overlap"] == 1.0
    collected = contamination.EvalNgrams(13, 3)
    collected.add([t for _, t in docs])
    collected.flush()
    mapped = [contamination.train_partitions(TEXTS[:2], 13, 3), contamination.train_partitions(TEXTS[2:5], 13, 3)]
    hits = np.zeros(len(docs), dtype=np.int64)
    for p in range(3):
        ids, counts = contamination.partition_hits(collected.chunks[p], [m[p] for m in mapped])
        hits[ids] += counts
    assert contamination.report([k for k, _ in docs], contamination.overlaps(hits, collected.ngrams), e) == result


def test_eval_streams_the_split_per_shard_and_caps_to_the_smallest_keys(tmp_path):
    from llm_ray.eval.run import chunks, held_out_documents, take
    from tests.test_contamination import write_prepared

    # Keys out of order across shards; two thirds of the documents in val.
    shards = [[(f"k{i:02d}", f"text number {i}", "train" if i % 3 == 0 else "val") for i in range(s, s + 10)]
              for s in (20, 0, 10)]
    data = write_prepared(tmp_path, shards)
    split, batches = held_out_documents(load_config("debug"), data, "auto")
    batches = list(batches)
    assert split == "val" and [len(b) for b in batches] == [7, 6, 7]  # one list per documents shard, in order
    every = [d for b in batches for d in b]
    assert every[0] == ("k20", "text number 20")
    # eval.max_documents: the documents sorting all and taking the first would give, in key order.
    _, [chosen] = held_out_documents(load_config("debug", ["eval.max_documents=5"]), data, "val")
    assert chosen == sorted(every)[:5]
    first, rest = take(iter(batches), 8)
    assert len(first) == 13 and first + [d for b in rest for d in b] == every  # whole batches: at least 8
    assert [len(c) for c in chunks(iter(batches), 6)] == [6, 6, 6, 2]
    assert [d for c in chunks(iter(batches), 6) for d in c] == every


def test_eval_files_stream_in_chunks_and_a_broken_file_stops_the_evaluation(tmp_path, monkeypatch):
    """--eval-data: lists of at most LOCAL_CHUNK_DOCS documents of one file each, blank documents left out;
    a broken file raises EvalError naming it, after the documents before it came out."""
    import json

    from llm_ray.eval import run

    monkeypatch.setattr(run, "LOCAL_CHUNK_DOCS", 2)
    lines = [{"text": f"document {i}"} for i in range(5)] + [{"text": "  "}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "last"}) + "\n")
    batches = list(run.files_documents(load_config("debug"), str(tmp_path)))
    assert [[t for _, t in b] for b in batches] == [["document 0", "document 1"], ["document 2", "document 3"],
                                                    ["document 4"], ["last"]]
    capped = run.files_documents(load_config("debug", ["eval.max_documents=2"]), str(tmp_path))
    assert [t for b in capped for _, t in b] == ["document 0", "document 1"]  # a.jsonl:1 < a.jsonl:2 < b.jsonl:1

    (tmp_path / "c.txt").write_bytes(b"text\x00with a NUL byte")
    batches = run.files_documents(load_config("debug"), str(tmp_path))
    assert len([d for _, b in zip(range(4), batches) for d in b]) == 6
    with pytest.raises(run.EvalError, match=r"unreadable evaluation file .*c\.txt: binary"):
        next(batches)


def test_scoring_in_chunks_sums_what_scoring_at_once_does(small_model, monkeypatch):
    """score_stream in this process: per-document sums in order, loss by position summed over documents,
    continuation candidates and n-gram counts gathered on the way; the plots take the summed rows."""
    from llm_ray.eval import contamination, run
    from llm_ray.eval.report import plot
    from llm_ray.eval.run import ScoreSums, score_stream

    model, tokenizer = small_model
    docs = [(f"d{i}", t) for i, t in enumerate([TEXTS[0][:800], "Short.", TEXTS[1][:300], TEXTS[2][:1200], "To be."])]
    e = EvalConfig(stride=16, batch_size=4, prompt_tokens=8, continuation_tokens=8, continuation_documents=2)
    whole = DocumentScorer(model, tokenizer, stride=16, batch_size=4).score([t for _, t in docs])
    collected = contamination.EvalNgrams(13, 2)
    monkeypatch.setattr(run, "LOCAL_CHUNK_DOCS", 2)  # chunks of 2, 1 (the first shard), 2 (the second)
    sums, keys, candidates = score_stream(iter([docs[:3], docs[3:]]), "local", None, model, tokenizer, e, collected)
    assert keys == [k for k, _ in docs] and [k for k, _ in candidates] == ["d0", "d2"]
    for k in ScoreSums.PER_DOCUMENT:
        assert np.allclose(sums[k], whole[k], rtol=1e-6)  # float32 windows batched differently, as above
    for k in ScoreSums.BY_POSITION:
        assert sums[k].shape == (1, model.spec.context_length)
        assert np.allclose(sums[k][0], whole[k].sum(axis=0), rtol=1e-6)
    assert collected.ngrams.tolist() == [len(ngrams.ngram_hashes(t, 13)) for _, t in docs]
    results = {"bits_per_byte": metrics.summarize(sums["nll_sum"], sums["tokens"], sums["bytes"], 50, 0)[
        "bits_per_byte"]}
    assert plot(results, sums, []).startswith(b"\x89PNG")


def test_eval_report_draws_well_counted_positions_and_writes_one_number_as_text(tmp_path):
    """eval.json keeps the loss by position only where 100 tokens or more were scored, with their counts; eval.png
    says so, and gives bits per byte as a number with its interval (read back from its Description), not a bar."""
    import json

    from PIL import Image

    from llm_ray.eval.report import write_report
    from llm_ray.storage import Location

    # 3 documents, context 8. Positions 0-3 come from each document's first window only (3 tokens); 4-6 are
    # scored 60 + 60 + 40 = 160 times, 7 only 30 + 30 = 60 times. Documents 0 and 1 lose 2 nats a token, 2 loses 3.
    count = np.array([[1] * 4 + [60, 60, 60, 30], [1] * 4 + [60, 60, 60, 30], [1] * 4 + [40, 40, 40, 0]])
    loss = np.array([[2.0], [2.0], [3.0]])
    sums = {"position_count": count, "position_nll": count * loss, "tokens": count.sum(axis=1),
            "nll_sum": (count * loss).sum(axis=1), "bytes": 4 * count.sum(axis=1)}
    results = {"checkpoint": "ckpt", "documents_from": "d", "split": "val", "documents": 3,
               "tokens": int(count.sum()), "bytes": int(sums["bytes"].sum()), "context": 8, "stride": 4,
               **metrics.summarize(sums["nll_sum"], sums["tokens"], sums["bytes"], 50, 0)}
    write_report(results, sums, [], Location.parse(tmp_path))
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["loss_by_position"] == {"min_tokens": 100, "positions_scored": 8, "position": [4, 5, 6],
                                           "loss": [pytest.approx((2 * 120 + 3 * 40) / 160)] * 3,
                                           "tokens": [160, 160, 160]}
    with Image.open(tmp_path / "eval.png") as image:
        description = image.text["Description"]
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert "positions with ≥ 100 scored tokens: 3 of 8" in description
    lo, hi = results["bits_per_byte"]["ci95"]
    assert f"bits per byte {results['bits_per_byte']['value']:.4f} 95% interval [{lo:.4f}, {hi:.4f}]" in description
    assert not (pixels == (44, 160, 44)).all(axis=1).any()  # no tab:green: the former single bar is gone

    sums["position_count"] = count[:, :4]  # the demo's case: no position is scored often enough
    sums["position_nll"] = (count * loss)[:, :4]
    write_report(results, sums, [], Location.parse(tmp_path))
    assert json.loads((tmp_path / "eval.json").read_text())["loss_by_position"]["position"] == []
    with Image.open(tmp_path / "eval.png") as image:
        assert "no position has 100 scored tokens (the most at one position: 3)" in image.text["Description"]
