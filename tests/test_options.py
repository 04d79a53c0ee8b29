"""Each option run with and without it, showing the effect it promises (no Ray)."""

import numpy as np
import pytest
import torch

from llm_ray.config import EvalConfig, S3Config, load_config, model_spec
from llm_ray.data.clean import clean_document
from llm_ray.model import GPT
from tests.conftest import CORPUS

PLAY = (CORPUS / "play_00.txt").read_text()
SENTENCE = "the quick brown fox jumps over the lazy dog again and again"
CLEANING_CASES = [  # (field, value that drops the document, text, reason)
    ("min_mean_word_length", 20, PLAY, "mean_word_length"),
    ("max_mean_word_length", 1.5, PLAY, "mean_word_length"),
    ("max_symbol_word_ratio", 0.001, PLAY + "\n# # # # #\n", "symbol_word_ratio"),
    ("max_ellipsis_line_fraction", 0.01, PLAY + "\nand so...\nand then...\nand more...\n", "ellipsis_lines"),
    ("max_duplicate_line_fraction", 0.0, PLAY + f"\n{SENTENCE}\n{SENTENCE}\n", "duplicate_lines"),
    ("max_top_2gram_fraction", 0.001, PLAY, "top_2gram"),
    ("max_duplicate_5gram_fraction", 0.0, PLAY + f"\n{SENTENCE}, {SENTENCE}.\n", "duplicate_5grams"),
    ("min_alpha_word_fraction", 1.0, PLAY + "\n1 2 3 4 5\n", "alpha_words"),
]


@pytest.mark.parametrize("field, value, text, reason", CLEANING_CASES)
def test_each_cleaning_threshold_drops_what_it_names(field, value, text, reason):
    kept, why = clean_document(text, load_config("debug").cleaning)
    assert kept is not None, why  # the defaults keep it
    dropped, why = clean_document(text, load_config("debug", [f"cleaning.{field}={value}"]).cleaning)
    assert dropped is None and why == reason, (field, why)


def test_adam_betas_change_the_update():
    from llm_ray.config import TrainConfig
    from llm_ray.train.engine import build_optimizer

    def after_three_steps(beta1: float, beta2: float) -> torch.Tensor:
        w = torch.nn.Parameter(torch.ones(4))
        opt = build_optimizer([{"params": [w], "weight_decay": 0.0}],
                              TrainConfig(lr=0.1, beta1=beta1, beta2=beta2, optimizer="adam"))
        for g in (1.0, -0.5, 2.0):
            w.grad = torch.full((4,), g)
            opt.step()
        return w.detach().clone()

    base = after_three_steps(0.9, 0.95)
    assert not torch.allclose(base, after_three_steps(0.0, 0.95))  # beta1: momentum of the gradient
    assert not torch.allclose(base, after_three_steps(0.9, 0.5))  # beta2: memory of its scale


def test_dropout_makes_training_passes_random_and_leaves_evaluation_alone():
    x = torch.randint(0, 512, (2, 16))
    for dropout, random_in_training in ((0.0, False), (0.5, True)):
        torch.manual_seed(0)
        model = GPT(model_spec(load_config("debug", [f"model.dropout={dropout}"])))
        model.train()
        differs = not torch.equal(model(x)[0], model(x)[0])
        assert differs == random_in_training
        model.eval()
        assert torch.equal(model(x)[0], model(x)[0])


def test_eval_batches_sets_how_many_validation_blocks_are_scored(tmp_path):
    from llm_ray.train.data import PackedBlocks, validation_batches

    np.save(tmp_path / "val.npy", np.arange(100 * 9).reshape(100, 9).astype(np.uint16))
    blocks = PackedBlocks([tmp_path / "val.npy"])
    for eval_batches in (1, 4):
        t = load_config("debug", [f"train.eval_batches={eval_batches}"]).train
        scored = sum(len(b) * w for b, w in validation_batches(blocks, t.eval_batches * t.micro_batch_size, 0, 0,
                                                                 1, t.micro_batch_size))
        assert scored == eval_batches * t.micro_batch_size


def test_torch_threads_sets_the_workers_threads():
    from llm_ray.train.worker import apply_torch_threads

    before = torch.get_num_threads()
    try:
        apply_torch_threads(load_config("debug").train.torch_threads)  # null: unchanged
        assert torch.get_num_threads() == before
        apply_torch_threads(load_config("debug", ["train.torch_threads=1"]).train.torch_threads)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_train_sample_bytes_limits_what_the_tokenizer_learns_from():
    from llm_ray.data.tokenizer import train_bpe

    texts = [p.read_text() for p in sorted(CORPUS.glob("play_*.txt"))]
    sizes = {}
    for sample in (1000, 100_000):
        t = load_config("debug", [f"tokenizer.train_sample_bytes={sample}"]).tokenizer
        sizes[sample] = train_bpe(texts, t.vocab_size, t.min_frequency, t.train_sample_bytes).get_vocab_size()
    assert sizes[1000] < sizes[100_000]  # too little text for all the merges asked for


def test_wandb_mode(monkeypatch):
    from llm_ray.tracking import wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(load_config("debug").tracking.wandb_mode) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode(load_config("debug", ["tracking.wandb_mode=offline"]).tracking.wandb_mode) == "offline"


def test_s3_region_reaches_the_filesystem():
    from llm_ray.storage import s3_filesystem

    assert s3_filesystem(S3Config(region="eu-west-3")).region == "eu-west-3"
    assert s3_filesystem(S3Config()).region == "us-east-1"


def test_eval_backend_follows_ray_min_documents():
    from llm_ray.eval.run import choose_backend

    e = EvalConfig(ray_min_documents=100)
    assert choose_backend(e, 99) == "local" and choose_backend(e, 100) == "ray"
    assert choose_backend(EvalConfig(backend="local", ray_min_documents=1), 10**6) == "local"


def test_contamination_ngram_sets_the_overlap_length():
    from llm_ray.eval import tasks

    texts = [p.read_text() for p in sorted(CORPUS.glob("play_*.txt"))]
    doc = [("other play", texts[9])]
    overlaps = {}
    for n in (2, 13):
        e = EvalConfig(contamination_ngram=n)
        overlaps[n] = tasks.contamination(doc, tasks.ngram_index(texts[:5], e.contamination_ngram), e)["mean_overlap"]
    assert overlaps[2] > 0.1 > overlaps[13]  # common word pairs are shared; 13-word runs are not


def test_continuation_tokens_and_samples_shown():
    from llm_ray.data.tokenizer import train_bpe
    from llm_ray.eval import tasks

    texts = [p.read_text() for p in sorted(CORPUS.glob("play_*.txt"))]
    tokenizer = train_bpe(texts, 300, 2, 100_000)
    torch.manual_seed(0)
    model = GPT(model_spec(load_config("debug", ["tokenizer.vocab_size=300"]))).eval()
    docs = [(f"doc{i}", t) for i, t in enumerate(texts[:4])]
    for tokens, shown in ((4, 1), (12, 3)):
        e = EvalConfig(prompt_tokens=8, continuation_tokens=tokens, samples_shown=shown, continuation_documents=4)
        result = tasks.continuation_task(model, tokenizer, docs, e)
        assert len(result["samples"]) == shown and result["settings"]["continuation_tokens"] == tokens
        assert all(len(tokenizer.encode(s["reference"]).ids) <= tokens + 1 for s in result["samples"])
