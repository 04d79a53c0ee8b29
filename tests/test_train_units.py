import pytest
import torch

from llm_ray.config import load_config, model_spec
from llm_ray.model import GPT
from llm_ray.train.engine import deepspeed_config, param_groups
from llm_ray.train.schedule import lr_at


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [lr_at(s, 1.0, 0.1, 10, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rising
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))  # falling
    assert lrs[60] == pytest.approx(0.55)  # half-way through the cosine
    assert lrs[110:] == [pytest.approx(0.1)] * 10


def test_no_decay_groups():
    model = GPT(model_spec(load_config("debug")))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in decayed)
    assert "transformer.wte.weight" in {names[id(p)] for p in no_decay["params"]}
    n_total = sum(p.numel() for p in model.parameters())  # tied weight counted once
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_total


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_is_derived(stage):
    cfg = load_config("demo", [f"train.zero_stage={stage}", "train.total_batch_tokens=16384"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == stage
    # 16384 tokens / (16 sequences x 128 tokens x 2 workers) = 4 accumulation steps
    assert ds["gradient_accumulation_steps"] == 4 == cfg.grad_accum_steps
    assert ds["train_batch_size"] == 16 * 4 * 2
    assert ds["bf16"]["enabled"] is False


def test_bf16_precision_enables_deepspeed_bf16():
    assert deepspeed_config(load_config("gpt2-124m"))["bf16"]["enabled"] is True


def test_split_block_shifts_targets():
    from llm_ray.train.loop import split_block

    x, y = split_block(torch.arange(10, dtype=torch.int16).view(2, 5), "cpu")
    assert x.dtype == torch.long and x.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert y.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]
