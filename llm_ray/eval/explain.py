"""`llm-ray explain`: what the model attends to, and which tokens drive its next-token prediction.

Attention weights come from the model's opt-in path (``keep_attention`` on each attention
layer: explicit softmax instead of the fused kernel), not from a second model. Attributions
are Captum's, for the probability of the predicted (or given) next token:

- gradient x input and integrated gradients on the token embeddings (summed over the width);
- KernelSHAP and LIME, model-agnostic: each token is a feature, removed by replacing it with
  the padding token. LIME fits a ridge regression, weighted by how many tokens a sample keeps;
  Captum's default Lasso (alpha 0.01) shrinks every weight to zero when the probability moves by
  less than about 0.01, which is most of a small model's predictions.

The methods answer slightly different questions, so the output says how far they agree
(Spearman rank correlation of their per-token scores; undefined when a method scores every
token alike, since a constant has no ranking).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from llm_ray.data.tokenizer import EOT, PAD
from llm_ray.storage import as_location, local_folder

METHODS = ("gradient_x_input", "integrated_gradients", "kernel_shap", "lime")
UNDEFINED = "undefined"  # the rank correlation with a method whose scores are constant
# LIME's own text defaults (lime.lime_text): ridge with alpha 1 and an exponential kernel of width 25 on the
# cosine distance x 100 between a sample's kept-token mask and all tokens kept, i.e. width 0.25 unscaled.
# Ridge shrinks every weight by the same factor whatever the scale of the probability, where Lasso's alpha
# is a threshold in probability units that zeroes every weight below it.
LIME_RIDGE_ALPHA = 1.0
LIME_KERNEL_WIDTH = 0.25


def attention_maps(model, ids: torch.Tensor) -> torch.Tensor:
    """(n_layer, n_head, T, T) attention weights of one sequence ids (1, T)."""
    layers = [block.attn for block in model.transformer.h]
    for attn in layers:
        attn.keep_attention = True
    try:
        with torch.no_grad():
            model(ids)
        return torch.stack([attn.last_attention[0] for attn in layers])
    finally:
        for attn in layers:
            attn.keep_attention, attn.last_attention = False, None


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho (ties share their mean rank); None when either scores every token alike."""
    from scipy.stats import spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def agreement(scores: dict) -> dict:
    """Spearman's rho of each pair of methods, or UNDEFINED where one of the two scores every token alike."""
    rhos = {f"{a} ~ {b}": rank_correlation(scores[a], scores[b])
            for i, a in enumerate(METHODS) for b in METHODS[i + 1:]}
    return {pair: UNDEFINED if rho is None else rho for pair, rho in rhos.items()}


def lime_similarity(original, perturbed, kept: torch.Tensor, **kwargs) -> float:
    """LIME's sample weight: exponential kernel on the cosine distance between the kept-token mask (1, T) and
    all tokens kept. Captum's default measures it on the token ids themselves, whose values mean nothing."""
    distance = 1.0 - math.sqrt(float(kept.float().mean()))  # cos(mask, ones) = sqrt(kept / T)
    return math.exp(-distance**2 / (2 * LIME_KERNEL_WIDTH**2))


def attributions(model, ids: torch.Tensor, target: int, pad_id: int, samples: int = 200, seed: int = 0) -> dict:
    """Per-token attribution (T,) for each method, of the probability of `target` after ids (1, T)."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import KernelShap, LayerGradientXActivation, LayerIntegratedGradients, Lime

    def prob(token_ids: torch.Tensor) -> torch.Tensor:  # (N, T) -> (N,) probability of the target next
        logits, _ = model(token_ids.long())
        return logits[:, -1, :].float().softmax(dim=-1)[:, target]

    embeddings = model.transformer.wte
    baseline = torch.full_like(ids, pad_id)
    out = {
        "gradient_x_input": LayerGradientXActivation(prob, embeddings).attribute(ids).sum(-1)[0],
        "integrated_gradients": LayerIntegratedGradients(prob, embeddings).attribute(
            ids, baselines=baseline, n_steps=32).sum(-1)[0],
    }
    mask = torch.arange(ids.size(1))[None, :]  # each token its own feature
    torch.manual_seed(seed)
    out["kernel_shap"] = KernelShap(prob).attribute(ids, baselines=baseline, feature_mask=mask,
                                                    n_samples=samples)[0]
    torch.manual_seed(seed)
    lime = Lime(prob, interpretable_model=SkLearnRidge(alpha=LIME_RIDGE_ALPHA), similarity_func=lime_similarity)
    out["lime"] = lime.attribute(ids, baselines=baseline, feature_mask=mask, n_samples=samples)[0]
    return {k: v.detach().double().numpy() for k, v in out.items()}


def explain(checkpoint: str | Path, text: str, target: str | None = None, out_root: Path | None = None,
            samples: int = 200) -> dict:
    """Attention maps and attributions for the token after text; written to <run>/explain/<slug>/."""
    from llm_ray.checkpoint import find_model_dir, load_model
    from llm_ray.eval.run import eval_folder

    model_dir = find_model_dir(checkpoint)
    model, tokenizer, cfg = load_model(model_dir)
    model.eval()
    eot, pad = tokenizer.token_to_id(EOT), tokenizer.token_to_id(PAD)
    token_ids = [eot] + tokenizer.encode(text, add_special_tokens=False).ids
    token_ids = token_ids[-model.spec.context_length :]
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        probs = model(ids)[0][0, -1].float().softmax(-1)
    if target is not None:
        target_ids = tokenizer.encode(target, add_special_tokens=False).ids
        if not target_ids:
            raise ValueError("--target is empty after tokenization")
        target_id = target_ids[0]
    else:
        target_id = int(probs.argmax())
    scores = attributions(model, ids, target_id, pad, samples)
    tokens = [tokenizer.decode([t]) if t != eot else EOT for t in token_ids]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "text"
    target_folder = (as_location(out_root, cfg.data.s3, "--out") if out_root
                     else eval_folder(cfg, model_dir).parent / "explain") / slug
    attention = attention_maps(model, ids)
    result = {"text": text, "tokens": tokens, "target": tokenizer.decode([target_id]), "target_id": target_id,
              "target_probability": float(probs[target_id]),
              "attributions": {k: v.tolist() for k, v in scores.items()}, "rank_correlation": agreement(scores),
              "note": "Spearman rank correlations between the methods' per-token scores: near 1, they rank the "
                      f"tokens alike; {UNDEFINED} when a method scores every token alike; near 0 or below, read "
                      "each method for what it measures (gradients: local sensitivity; integrated gradients: "
                      "path from padding; SHAP and LIME: removing tokens).",
              "folder": target_folder.uri}
    with local_folder(target_folder) as out:  # uploaded afterwards for a run on S3
        (out / "attributions.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        plot_attention(attention, tokens, out / "attention.png")
        plot_attributions(scores, tokens, result["target"], out / "attributions.png")
    return result


def plot_attention(attention: torch.Tensor, tokens: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layer, n_head = attention.shape[:2]
    fig, axes = plt.subplots(n_layer, n_head, figsize=(3 * n_head, 3 * n_layer), squeeze=False)
    labels = [t.replace("\n", "\\n") for t in tokens]
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            ax.imshow(attention[layer, head].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
            if len(tokens) <= 24:
                ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(len(tokens)), labels, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_attributions(scores: dict, tokens: list[str], target: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(scores), 1, figsize=(max(6, 0.35 * len(tokens)), 2.2 * len(scores)), squeeze=False)
    labels = [t.replace("\n", "\\n") for t in tokens]
    for ax, (name, values) in zip(axes[:, 0], scores.items()):
        ax.bar(range(len(values)), values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
        ax.set_title(f"{name}: attribution to p({target!r} next)", fontsize=9)
        ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
