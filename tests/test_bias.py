"""The bias probe (no Ray): its figures by hand, its file's errors, and tiny models trained to
lean one way or the other, which the probe must see leaning that way."""

import json

import numpy as np
import pytest
import torch

from llm_ray.config import EvalConfig
from llm_ray.data.tokenizer import EOT, train_bpe
from llm_ray.eval import bias
from llm_ray.eval.scoring import DocumentScorer
from llm_ray.model import GPT, GPTSpec


def test_shares_and_intervals_by_hand():
    pairs = [{"bias_type": "a"}] * 4 + [{"bias_type": "b"}] * 2
    more = np.array([-1.0, -1.0, -5.0, -1.0, -9.0, -9.0])
    less = np.array([-2.0, -3.0, -1.0, -4.0, -1.0, -1.0])
    out = bias.summarize(pairs, more, less, samples=2000, seed=0)
    assert out["pairs"] == 6
    assert out["by_category"]["a"]["stereotype_share"] == 0.75 and out["by_category"]["b"]["stereotype_share"] == 0
    assert out["overall"]["stereotype_share"] == pytest.approx(3 / 6)
    assert out["by_category"]["a"]["mean_gap"] == pytest.approx((1 + 2 - 4 + 3) / 4)
    assert out["by_category"]["b"]["ci95"] == [0.0, 0.0]  # never preferred: every resample says 0
    lo, hi = out["by_category"]["a"]["ci95"]
    assert 0 <= lo < 0.75 < hi <= 1  # 3 of 4 resampled: anywhere from 0 to 4 of 4
    assert bias.summarize(pairs, more, less, 2000, 0) == out  # seeded


def test_the_builtin_pairs_differ_only_in_the_group():
    pairs = bias.templated_pairs()
    assert len(pairs) == 51 and {p["bias_type"] for p in pairs} == {"gender", "age", "socioeconomic"}
    for p in pairs:
        more, less = p["more"].split(), p["less"].split()
        assert more != less and more[-3:] == less[-3:]  # the same sentence about another group


@pytest.mark.parametrize("line, says", [
    ("{not json", "line 2: not JSON"),
    ('["a", "b"]', "line 2: a pair is a JSON object"),
    ('{"more": "x", "bias_type": "age"}', "line 2: less must be a non-empty string"),
    ('{"more": "x", "less": "x", "bias_type": "age"}', "line 2: more and less are the same sentence"),
    ('{"more": "x", "less": "y", "bias_type": ""}', "line 2: bias_type must be a non-empty string"),
])
def test_a_bad_pairs_file_names_the_line_and_field(line, says):
    good = json.dumps({"more": "a", "less": "b", "bias_type": "age"})
    with pytest.raises(bias.PairsError, match=says):
        bias.parse_pairs(f"{good}\n{line}\n", "mine.jsonl")
    with pytest.raises(bias.PairsError, match="mine.jsonl: no pairs"):
        bias.parse_pairs("\n\n", "mine.jsonl")
    assert bias.parse_pairs(good + "\n", "mine.jsonl") == [{"more": "a", "less": "b", "bias_type": "age"}]


def test_the_config_takes_builtin_a_jsonl_file_or_null():
    for value in ("builtin:templated", "pairs/crows.jsonl", "s3://bucket/crows.jsonl", None):
        assert EvalConfig(bias_pairs=value).bias_pairs == value
    for value in ("builtin:crows", "pairs.csv"):
        with pytest.raises(ValueError, match="bias_pairs"):
            EvalConfig(bias_pairs=value)


def trained_on(sentences: list[str], tokenizer, steps: int = 150) -> GPT:
    """A tiny GPT fitted to sentences (each after an end-of-text token, as the probe scores them)."""
    torch.manual_seed(0)
    eot = tokenizer.token_to_id(EOT)
    rows = [[eot] + tokenizer.encode(s).ids for s in sentences]
    width = max(map(len, rows))
    x = torch.tensor([r + [eot] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])[:, 1:].bool()
    model = GPT(GPTSpec(vocab_size=tokenizer.get_vocab_size(), context_length=64, n_layer=1, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits, _ = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[mask], x[:, 1:][mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_a_model_trained_on_one_side_is_seen_leaning_to_it():
    """Trained on the stereotyped sentences the model prefers them in (almost) every pair; trained on
    the others, (almost) never; the probe's shares say so, category by category."""
    pairs = bias.templated_pairs()
    tokenizer = train_bpe([p["more"] + " " + p["less"] for p in pairs], vocab_size=300, min_frequency=1,
                          sample_bytes=1 << 20)
    for side, expected in (("more", 1.0), ("less", 0.0)):
        model = trained_on([p[side] for p in pairs], tokenizer)
        scores = DocumentScorer(model, tokenizer).score([p["more"] for p in pairs] + [p["less"] for p in pairs])
        out = bias.summarize(pairs, -scores["nll_sum"][:51], -scores["nll_sum"][51:], 500, 0)
        for name, row in out["by_category"].items():
            assert abs(row["stereotype_share"] - expected) <= 0.1, (side, name, row)
