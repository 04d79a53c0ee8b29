"""Export a checkpoint to a Hugging Face folder that `transformers` loads as is.

Learned positions, LayerNorm and GELU (tanh) or squared ReLU are GPT-2 (`GPT2LMHeadModel`, whose
activation_function takes "relu2"); RoPE, RMSNorm and SwiGLU are Llama (`LlamaForCausalLM`), and with
query/key norms Qwen3 (`Qwen3ForCausalLM`: Llama with an RMSNorm over each head's queries and keys
before the rotation, no MLP biases). An output layer with its own weight is exported as such
(tie_word_embeddings false). Other combinations, and capped logits, have no standard architecture
and are refused, naming the option. The weights are renamed and reshaped here, nowhere else:

- GPT-2 keeps llm-ray's parameter names but stores its linear layers as Conv1D, (in, out):
  every c_attn, c_proj and c_fc matrix is transposed. A model without biases gets zero ones.
- Llama splits the fused q/k/v projection and the fused SwiGLU gate/value layer. llm-ray's
  RoPE rotates the two halves of each head, as Hugging Face's Llama does, so q and k need no
  permutation.

`transformers` is an optional dependency: `pip install -e .[hf]`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm_ray.checkpoint import find_model_dir, load_model
from llm_ray.checkpoint.best import read_state
from llm_ray.checkpoint.provenance import PROVENANCE, provenance
from llm_ray.data.tokenizer import EOT, PAD


class ExportError(Exception):
    """The checkpoint cannot be exported as asked, described for the user."""


def architecture(spec) -> str:
    """'gpt2', 'llama' or 'qwen3' for a model spec; ExportError naming every option in the way otherwise."""
    shape = (spec.pos_encoding, spec.norm, spec.mlp)
    if shape in (("learned", "layernorm", "gelu"), ("learned", "layernorm", "relu2")):
        arch = "gpt2"
    elif shape == ("rope", "rmsnorm", "swiglu"):
        arch = "qwen3" if spec.qk_norm else "llama"
    else:
        raise ExportError(
            f"model.pos_encoding={spec.pos_encoding}, model.norm={spec.norm}, model.mlp={spec.mlp} is no Hugging "
            "Face architecture: train with learned, layernorm, gelu or relu2 (GPT-2) or rope, rmsnorm, swiglu "
            "(Llama; Qwen3 with model.qk_norm)")
    refused = []
    if spec.qk_norm and arch == "gpt2":
        refused.append("model.qk_norm=true (GPT-2 has no query/key norm; with rope, rmsnorm, swiglu it is Qwen3)")
    if arch == "qwen3" and spec.bias:
        refused.append("model.qk_norm=true with model.bias=true (Qwen3 has no MLP biases; train with "
                       "model.bias=false)")
    if spec.logit_softcap is not None:
        refused.append(f"model.logit_softcap={spec.logit_softcap} (GPT-2, Llama and Qwen3 do not cap logits; "
                       "train with model.logit_softcap=null)")
    if refused:
        raise ExportError(f"no Hugging Face architecture computes {'; '.join(refused)}")
    return arch


def gpt2_state(model) -> tuple[dict, dict]:
    """(GPT2Config kwargs, GPT2LMHeadModel state dict) of an llm-ray GPT-2-shaped model."""
    s = model.spec
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and s.tie_embeddings:
            continue  # tied to transformer.wte.weight
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            tensor = tensor.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        state[name] = tensor.contiguous()
    if not s.bias:  # GPT-2 always has biases: zeros are the same function
        for i in range(s.n_layer):
            p = f"transformer.h.{i}."
            for name, size in (("ln_1", s.n_embd), ("ln_2", s.n_embd), ("attn.c_attn", 3 * s.n_embd),
                               ("attn.c_proj", s.n_embd), ("mlp.c_fc", 4 * s.n_embd), ("mlp.c_proj", s.n_embd)):
                state[f"{p}{name}.bias"] = torch.zeros(size)
        state["transformer.ln_f.bias"] = torch.zeros(s.n_embd)
    activation = {"gelu": "gelu_new", "relu2": "relu2"}[s.mlp]  # gelu_new: GELU's tanh approximation
    config = dict(vocab_size=s.vocab_size, n_positions=s.context_length, n_embd=s.n_embd, n_layer=s.n_layer,
                  n_head=s.n_head, activation_function=activation, layer_norm_epsilon=1e-5, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=s.tie_embeddings)
    return config, state


def llama_state(model) -> tuple[dict, dict]:
    """(LlamaConfig kwargs, LlamaForCausalLM state dict) of an llm-ray Llama-shaped model; with
    qk_norm, (Qwen3Config kwargs, Qwen3ForCausalLM state dict)."""
    s = model.spec
    C = s.n_embd
    src = model.state_dict()
    hidden = src["transformer.h.0.mlp.c_proj.weight"].shape[1]
    state = {"model.embed_tokens.weight": src["transformer.wte.weight"],
             "model.norm.weight": src["transformer.ln_f.weight"]}
    if not s.tie_embeddings:
        state["lm_head.weight"] = src["lm_head.weight"]
    for i in range(s.n_layer):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = src[ours + "attn.c_attn.weight"].split(C, dim=0)
        gate, up = src[ours + "mlp.c_fc.weight"].split(hidden, dim=0)
        state.update({
            hf + "input_layernorm.weight": src[ours + "ln_1.weight"],
            hf + "post_attention_layernorm.weight": src[ours + "ln_2.weight"],
            hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k, hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": src[ours + "attn.c_proj.weight"],
            hf + "mlp.gate_proj.weight": gate, hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": src[ours + "mlp.c_proj.weight"],
        })
        if s.qk_norm:  # Qwen3's names, over each head's hs features as ours
            state.update({hf + "self_attn.q_norm.weight": src[ours + "attn.q_norm.weight"],
                          hf + "self_attn.k_norm.weight": src[ours + "attn.k_norm.weight"]})
        if s.bias:
            qb, kb, vb = src[ours + "attn.c_attn.bias"].split(C)
            gb, ub = src[ours + "mlp.c_fc.bias"].split(hidden)
            state.update({hf + "self_attn.q_proj.bias": qb, hf + "self_attn.k_proj.bias": kb,
                          hf + "self_attn.v_proj.bias": vb, hf + "self_attn.o_proj.bias": src[ours + "attn.c_proj.bias"],
                          hf + "mlp.gate_proj.bias": gb, hf + "mlp.up_proj.bias": ub,
                          hf + "mlp.down_proj.bias": src[ours + "mlp.c_proj.bias"]})
    config = dict(vocab_size=s.vocab_size, hidden_size=C, intermediate_size=hidden, num_hidden_layers=s.n_layer,
                  num_attention_heads=s.n_head, num_key_value_heads=s.n_head, head_dim=C // s.n_head,
                  max_position_embeddings=s.context_length, rms_norm_eps=1e-6, hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta}, attention_bias=s.bias,
                  attention_dropout=0.0, tie_word_embeddings=s.tie_embeddings)
    if not s.qk_norm:  # Qwen3 has no mlp_bias (architecture() refused biases with qk_norm)
        config["mlp_bias"] = s.bias
    return config, {k: v.contiguous() for k, v in state.items()}


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write checkpoint as a Hugging Face model and tokenizer folder; return the folder."""
    try:
        import transformers
    except ImportError:
        raise ExportError("exporting to Hugging Face needs transformers: pip install -e '.[hf]'") from None

    model, tokenizer, cfg = load_model(checkpoint)
    arch = architecture(model.spec)
    config_kwargs, state = gpt2_state(model) if arch == "gpt2" else llama_state(model)
    eot = tokenizer.token_to_id(EOT)
    pad = tokenizer.token_to_id(PAD)
    config_class, model_class = {"gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
                                 "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[arch]
    config = config_class(**config_kwargs, bos_token_id=eot, eos_token_id=eot, pad_token_id=pad)
    hf_model = model_class(config)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.spec.tie_embeddings else set()
    missing = [k for k in missing if k not in tied and not k.endswith(".attn.bias")]  # causal mask: no weight
    if missing or unexpected:
        raise ExportError(f"weights do not map onto {type(hf_model).__name__}: missing {missing}, "
                          f"unexpected {unexpected}")
    hf_model.tie_weights()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out, safe_serialization=True)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT,
                                                pad_token=PAD, model_max_length=model.spec.context_length)
    fast.save_pretrained(out)
    write_provenance(checkpoint, cfg, model, out)
    return out


def write_provenance(checkpoint, cfg, model, out: Path) -> None:
    """What the export was made from (run, config hash, step, data, scores), for serving it."""
    import json

    model_dir = find_model_dir(checkpoint).resolve()
    record = provenance(model_dir, cfg, read_state(model_dir), model.num_params(non_embedding=False))
    (out / PROVENANCE).write_text(json.dumps(record, indent=2), encoding="utf-8")
