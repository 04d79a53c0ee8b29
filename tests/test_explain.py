"""llm-ray explain on a small checkpoint (no Ray): files, the attention maps, and the axioms the
attribution methods promise."""

import json

import numpy as np
import pytest
import torch

from llm_ray.checkpoint import save_inference
from llm_ray.cli import main
from llm_ray.config import load_config, model_spec
from llm_ray.data.tokenizer import train_bpe
from llm_ray.model import GPT
from tests.conftest import CORPUS

import captum  # noqa: E402,F401  (a [test] dependency: missing, the tests fail rather than skip)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tokenizer = train_bpe([p.read_text() for p in sorted(CORPUS.glob("play_*.txt"))], 300, 2, 100_000)
    cfg = load_config("debug", ["tokenizer.vocab_size=300", f"output_dir={folder}"])
    torch.manual_seed(0)
    model = GPT(model_spec(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_inference(folder, model.state_dict(), cfg, tokenizer.to_str(), {})
    return folder


def test_explain_writes_maps_and_attributions_that_keep_their_promises(checkpoint, capsys):
    from llm_ray.checkpoint import load_model
    from llm_ray.eval.explain import METHODS

    assert main(["explain", "--checkpoint", str(checkpoint), "--text", "ROMEO: But soft, what light"]) == 0
    out = capsys.readouterr().out
    assert "rank agreement" in out
    from pathlib import Path

    folder = Path(out.strip().splitlines()[-1].removeprefix("written to "))
    assert folder == checkpoint / "explain" / "ROMEO-But-soft-what-light"  # the run folder does not exist here
    assert {"attention.png", "attributions.png", "attributions.json"} <= {p.name for p in folder.iterdir()}
    r = json.loads((folder / "attributions.json").read_text())
    n = len(r["tokens"])
    assert r["tokens"][0] == "<|endoftext|>" and set(r["attributions"]) == set(METHODS)
    assert all(len(v) == n for v in r["attributions"].values())
    assert len(r["rank_correlation"]) == 6 and "note" in r

    # Integrated gradients' completeness: the attributions add up to p(input) - p(all padding).
    model, tokenizer, _ = load_model(checkpoint)
    ids = torch.tensor([[tokenizer.token_to_id("<|endoftext|>")] +
                        tokenizer.encode("ROMEO: But soft, what light", add_special_tokens=False).ids])
    with torch.no_grad():
        p_in = model(ids)[0][0, -1].softmax(-1)[r["target_id"]]
        p_base = model(torch.full_like(ids, tokenizer.token_to_id("<|pad|>")))[0][0, -1].softmax(-1)[r["target_id"]]
    assert sum(r["attributions"]["integrated_gradients"]) == pytest.approx(float(p_in - p_base), abs=0.02)
    assert r["target_probability"] == pytest.approx(float(p_in), rel=1e-5)


def test_rank_correlation():
    from llm_ray.eval.explain import rank_correlation

    a = np.array([0.1, 0.5, -2.0, 3.0])
    assert rank_correlation(a, a * 10 + 1) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)


def test_explain_names_a_bad_checkpoint(tmp_path, capsys):
    assert main(["explain", "--checkpoint", str(tmp_path), "--text", "x"]) == 1
    assert "not an llm-ray checkpoint" in capsys.readouterr().err
