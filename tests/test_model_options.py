"""The modern recipe's model options (issue 23), each off by default and each measured with and without it
against a hand computation: query/key norms, squared-ReLU MLP, logit soft cap, untied output layer (through
checkpoints, serving's check and the memory estimate); and a training forward that never reads the device."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from llm_ray.checkpoint import load_model, save_inference
from llm_ray.config import ConfigError, load_config, model_spec
from llm_ray.data.tokenizer import train_bpe
from llm_ray.model import GPT, GPTSpec, KVCache
from llm_ray.model.gpt import MLP
from tests.conftest import CORPUS

V, C, NH = 97, 32, 4
HS = C // NH


def tiny(**kw) -> GPT:
    spec = dict(vocab_size=V, context_length=32, n_layer=2, n_head=NH, n_embd=C)
    spec.update(kw)
    torch.manual_seed(0)
    return GPT(GPTSpec(**spec)).eval()


# --- qk_norm ---------------------------------------------------------------------------------------------


def attention_with_scaled_qk(model: GPT, idx: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(first block's attention weights (B, nh, T, T), logits) after multiplying the query and key
    projections (the first 2C rows of c_attn) by scale."""
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.c_attn.weight[: 2 * C] *= scale
    attn.keep_attention = True
    logits = model(idx)[0]
    return attn.last_attention, logits


def logit_spread(att: torch.Tensor) -> float:
    """The largest log(a_ij / a_ik) over visible keys j, k of any query i: the spread of its attention logits."""
    T = att.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    log_att = att.log()
    top = log_att.masked_fill(~causal, -math.inf).amax(-1)
    bottom = log_att.masked_fill(~causal, math.inf).amin(-1)
    return float((top - bottom).max())


def test_qk_norm_bounds_the_attention_logits_however_large_the_projections():
    """Normed (RMSNorm, unit weights), q and k have length sqrt(hs), so every logit q.k / sqrt(hs) lies in
    [-sqrt(hs), sqrt(hs)] (Cauchy-Schwarz): two logits of a query differ by at most 2 sqrt(hs), whatever the
    scale of the projections, and scaling them changes nothing. Without the norms, 100x saturates softmax."""
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    bound = 2 * math.sqrt(HS)
    kw = dict(norm="rmsnorm", bias=False)

    normed = tiny(qk_norm=True, **kw)
    _, before = attention_with_scaled_qk(normed, idx, 1.0)
    att, after = attention_with_scaled_qk(normed, idx, 100.0)
    assert logit_spread(att) <= bound + 1e-4
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)  # the norms undo the scale

    plain = tiny(qk_norm=False, **kw)
    _, before = attention_with_scaled_qk(plain, idx, 1.0)
    att, after = attention_with_scaled_qk(plain, idx, 100.0)
    assert logit_spread(att) > 10 * bound
    assert att[..., 1:, :].amax(-1).mean() > 0.95  # most queries put (almost) all weight on one key
    assert (after - before).abs().max() > 1e-2  # a hundred times the tolerance above


@pytest.mark.parametrize("norm, names", [("rmsnorm", ["weight"]), ("layernorm", ["weight", "bias"])])
def test_qk_norm_has_a_norm_per_head_size_for_queries_and_keys(norm, names):
    normed, plain = tiny(qk_norm=True, norm=norm), tiny(norm=norm)
    params = dict(normed.named_parameters())
    for layer in range(2):
        for which in ("q_norm", "k_norm"):
            for name in names:
                assert params[f"transformer.h.{layer}.attn.{which}.{name}"].shape == (HS,)
    assert normed.num_params(non_embedding=False) - plain.num_params(non_embedding=False) == 2 * 2 * len(names) * HS
    assert not any("q_norm" in n for n in dict(plain.named_parameters()))


# --- relu2 -----------------------------------------------------------------------------------------------


def test_relu2_mlp_is_relu_squared_by_hand():
    spec = GPTSpec(vocab_size=V, context_length=32, n_layer=1, n_head=NH, n_embd=C, mlp="relu2")
    torch.manual_seed(0)
    mlp = MLP(spec)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 5, C)
    W1, b1 = mlp.c_fc.weight.detach(), mlp.c_fc.bias.detach()  # (4C, C)
    W2, b2 = mlp.c_proj.weight.detach(), mlp.c_proj.bias.detach()  # (C, 4C)
    h = torch.einsum("btc,hc->bth", x, W1) + b1
    expected = torch.einsum("bth,ch->btc", torch.where(h > 0, h * h, 0.0), W2) + b2
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)
    assert W1.shape == (4 * C, C)  # the GELU MLP's width and parameter count

    gelu = MLP(GPTSpec(**{**spec.__dict__, "mlp": "gelu"}))
    gelu.load_state_dict(mlp.state_dict())
    assert (gelu(x) - expected).abs().max() > 0.1  # a different function on the same weights


# --- logit_softcap ---------------------------------------------------------------------------------------


def hand_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The final norm's output (caught by a hook) times the output weight: the uncapped logits."""
    caught = []
    handle = model.transformer.ln_f.register_forward_hook(lambda m, i, out: caught.append(out))
    try:
        model(idx)
    finally:
        handle.remove()
    return caught[0] @ model.lm_head.weight.T


def test_logit_softcap_keeps_logits_within_the_cap_and_none_leaves_them_alone():
    cap = 30.0
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    capped, uncapped = tiny(logit_softcap=cap), tiny()
    with torch.no_grad():
        for m in (capped, uncapped):
            m.transformer.wte.weight.mul_(1000)  # the output weight too (tied): logits in the hundreds
    raw = hand_logits(uncapped, idx)
    assert raw.abs().max() > 10 * cap

    logits, loss = uncapped(idx, targets)
    torch.testing.assert_close(logits, raw, rtol=0, atol=0)  # None: the logits as they are

    logits, loss = capped(idx, targets)
    assert logits.abs().max() <= cap
    torch.testing.assert_close(logits, cap * torch.tanh(raw / cap), rtol=1e-6, atol=1e-5)
    by_hand = -torch.log_softmax(cap * torch.tanh(raw / cap), -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, by_hand)  # the loss is taken on the capped logits

    with pytest.raises(ValueError, match="logit_softcap must be positive"):
        tiny(logit_softcap=0.0)
    with pytest.raises(ConfigError, match="logit_softcap"):
        load_config("debug", ["model.logit_softcap=0"])


# --- tie_embeddings --------------------------------------------------------------------------------------


def test_an_untied_output_layer_has_its_own_weight():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    assert untied.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)  # initialized as GPT-2's
    grown = untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False)
    assert grown == V * C
    # The same matmuls: the token embedding's lookup costs no FLOPs, the output layer's matmul does.
    assert untied.num_params() == tied.num_params()
    assert untied.flops_per_token() == tied.flops_per_token()
    # A gradient step on the output layer leaves the token embedding where it was.
    before = untied.transformer.wte.weight.detach().clone()
    _, loss = untied(torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8)))
    loss.backward()
    with torch.no_grad():
        untied.lm_head.weight -= 0.1 * untied.lm_head.weight.grad
    assert torch.equal(before, untied.transformer.wte.weight)
    assert untied.transformer.wte.weight.grad.abs().sum() > 0  # it learns from its own lookups


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([p.read_text() for p in sorted(CORPUS.glob("play_*.txt"))], 300, 2, 100_000)


def save(folder, tokenizer, overrides) -> GPT:
    cfg = load_config("debug", ["tokenizer.vocab_size=300", *overrides])
    torch.manual_seed(0)
    model = GPT(model_spec(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_inference(folder, model.state_dict(), cfg, tokenizer.to_str(), {})
    return model


def test_an_untied_checkpoint_keeps_both_weights_and_loading_is_strict(tmp_path, tokenizer):
    untied = save(tmp_path / "untied", tokenizer, ["model.tie_embeddings=false"])
    tied = save(tmp_path / "tied", tokenizer, [])
    assert "lm_head.weight" in load_file(tmp_path / "untied" / "model" / "model.safetensors")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model" / "model.safetensors")
    for folder, saved in (("untied", untied), ("tied", tied)):
        loaded, _, cfg = load_model(tmp_path / folder)
        assert cfg.model.tie_embeddings == (folder == "tied")
        for name, tensor in saved.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
    loaded = load_model(tmp_path / "untied")[0]
    assert not torch.equal(loaded.lm_head.weight, loaded.transformer.wte.weight)
    assert loaded.lm_head.weight.data_ptr() != loaded.transformer.wte.weight.data_ptr()

    # A file and a config that disagree on tying are refused, naming the weight.
    weights = tmp_path / "untied" / "model" / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, weights)
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        load_model(tmp_path / "untied")
    save_file(state, tmp_path / "tied" / "model" / "model.safetensors")  # config.yaml: tied
    with pytest.raises(ValueError, match=r"unexpected \['lm_head.weight'\]"):
        load_model(tmp_path / "tied")


def test_serving_checks_an_untied_checkpoint_against_its_config(tmp_path, tokenizer):
    from llm_ray.serve.app import check_checkpoint

    save(tmp_path, tokenizer, ["model.tie_embeddings=false"])
    model_dir = tmp_path / "model"
    check_checkpoint(model_dir)  # fits
    config = (model_dir / "config.yaml").read_text()
    (model_dir / "config.yaml").write_text(config.replace("tie_embeddings: false", "tie_embeddings: true"))
    with pytest.raises(ConfigError, match="lm_head.weight differ"):
        check_checkpoint(model_dir)


def test_the_memory_estimate_counts_an_untied_output_layer():
    from llm_ray.sweep.memory import count_parameters, estimate_memory

    tied, untied = load_config("debug", []), load_config("debug", ["model.tie_embeddings=false"])
    assert count_parameters(untied) - count_parameters(tied) == tied.vocab_size * tied.model.n_embd
    assert estimate_memory(untied).weights > estimate_memory(tied).weights


def test_the_options_reach_the_model_spec_and_default_to_today():
    spec = model_spec(load_config("debug", []))
    assert (spec.qk_norm, spec.mlp, spec.logit_softcap, spec.tie_embeddings) == (False, "gelu", None, True)
    spec = model_spec(load_config("debug", ["model.qk_norm=true", "model.mlp=relu2", "model.logit_softcap=15",
                                            "model.tie_embeddings=false"]))
    assert (spec.qk_norm, spec.mlp, spec.logit_softcap, spec.tie_embeddings) == (True, "relu2", 15.0, False)


# --- no host sync in a training step --------------------------------------------------------------------

# Operators that read a tensor's values on the host (on a GPU: wait for the device). int(), float(),
# bool() and .item() all come down to _local_scalar_dense; the others size their output by the data.
HOST_READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal",
              "aten._unique2", "aten.unique_dim", "aten.unique_consecutive"}


class OperatorLog(TorchDispatchMode):
    """Every aten operator run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kw", [dict(), dict(pos_encoding="sinusoidal"),
                                dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True),
                                dict(mlp="relu2", logit_softcap=30.0, tie_embeddings=False, dropout=0.1)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_training_step_never_reads_the_device(kw, checkpointing):
    model = tiny(**kw).train()
    model.activation_checkpointing = checkpointing
    idx, targets = torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))
    with OperatorLog() as log:
        _, loss = model(idx, targets)
        loss.backward()
    assert "aten.mm" in log.names or "aten.addmm" in log.names  # the log sees the step's operators
    assert not HOST_READS & set(log.names), sorted(HOST_READS & set(log.names))
    # Decoding reads the cache's lengths (to check the context), and the log sees that read.
    model.eval()
    cache = KVCache(model.spec, 2, idx.device, torch.float32)
    with torch.no_grad(), OperatorLog() as log:
        model(idx, cache=cache)
    assert "aten._local_scalar_dense" in log.names
