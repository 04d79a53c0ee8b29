"""Hugging Face export: transformers loads the folder offline and computes our logits, greedy
continuations and token ids (no Ray)."""

import os

import pytest
import torch

from llm_ray.checkpoint import save_inference
from llm_ray.cli import main
from llm_ray.config import load_config, model_spec
from llm_ray.data.tokenizer import train_bpe
from llm_ray.export.hf import export_hf
from llm_ray.model import GPT, generate
from tests.conftest import CORPUS

import transformers  # noqa: E402  (a [test] dependency: missing, the tests fail rather than skip)
LLAMA = ["model.pos_encoding=rope", "model.norm=rmsnorm", "model.mlp=swiglu"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([p.read_text() for p in sorted(CORPUS.glob("play_*.txt"))], 300, 2, 100_000)


def checkpoint(tmp_path, tokenizer, overrides):
    """A checkpoint folder of a debug-sized model with perturbed (not freshly initialized) weights."""
    cfg = load_config("debug", ["tokenizer.vocab_size=300", *overrides])
    torch.manual_seed(0)
    model = GPT(model_spec(cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and norms away from their 0/1 initial values
    save_inference(tmp_path, model.state_dict(), cfg, tokenizer.to_str(), {})
    return model


UNTIED = "model.tie_embeddings=false"


@pytest.mark.parametrize("overrides, arch", [([], "GPT2LMHeadModel"), (["model.bias=false"], "GPT2LMHeadModel"),
                                             ([*LLAMA, "model.bias=false"], "LlamaForCausalLM"),
                                             (LLAMA, "LlamaForCausalLM"),
                                             ([UNTIED], "GPT2LMHeadModel"),
                                             (["model.mlp=relu2"], "GPT2LMHeadModel"),
                                             ([*LLAMA, UNTIED], "LlamaForCausalLM"),
                                             ([*LLAMA, "model.bias=false", "model.qk_norm=true"], "Qwen3ForCausalLM"),
                                             ([*LLAMA, "model.bias=false", "model.qk_norm=true", UNTIED],
                                              "Qwen3ForCausalLM")])
def test_transformers_loads_the_export_and_computes_the_same_model(tmp_path, tokenizer, monkeypatch, overrides, arch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = checkpoint(tmp_path, tokenizer, overrides)
    out = export_hf(tmp_path, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch
    untied = UNTIED in overrides
    assert hf.config.tie_word_embeddings is not untied
    out_weight, in_weight = hf.get_output_embeddings().weight, hf.get_input_embeddings().weight
    assert (out_weight.data_ptr() == in_weight.data_ptr()) is not untied
    torch.testing.assert_close(out_weight, ours.lm_head.weight, rtol=0, atol=0)
    x = torch.randint(0, 300, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], rtol=0, atol=1e-4)
    text = "ROMEO: But, soft! what light through yonder window breaks?"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tokenizer.decode(tokenizer.encode(text).ids) == text
    prompt = torch.tensor([tokenizer.encode(text).ids])
    greedy = generate(ours, prompt, 12, temperature=0)
    assert torch.equal(hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None), greedy)


def test_other_architectures_are_refused_naming_the_option(tmp_path, tokenizer, capsys):
    checkpoint(tmp_path, tokenizer, ["model.pos_encoding=sinusoidal"])
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "model.pos_encoding=sinusoidal" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()
    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--format", "hf", "--out", str(tmp_path)]) == 1
    assert "not an llm-ray checkpoint" in capsys.readouterr().err
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # damaged
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err and "Traceback" not in err


@pytest.mark.parametrize("overrides, named", [
    (["model.logit_softcap=30"], "model.logit_softcap=30.0"),
    ([*LLAMA, "model.bias=false", "model.logit_softcap=30"], "model.logit_softcap=30.0"),
    (["model.qk_norm=true"], "model.qk_norm=true"),
    ([*LLAMA, "model.qk_norm=true"], "model.bias=true"),
    (["model.mlp=relu2", "model.pos_encoding=rope"], "model.mlp=relu2"),
])
def test_options_no_architecture_computes_are_refused_naming_the_field(tmp_path, tokenizer, capsys, overrides, named):
    checkpoint(tmp_path, tokenizer, overrides)
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert not (tmp_path / "hf").exists()


def test_export_cli(tmp_path, tokenizer, capsys):
    checkpoint(tmp_path, tokenizer, LLAMA)
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}
    assert os.path.getsize(tmp_path / "hf" / "model.safetensors") > 0
