"""The evaluation report: eval.json (every figure), eval.md (a table to read), eval.png (plots)."""

from __future__ import annotations

import io

import numpy as np

from llm_ray.storage import Location

# The loss-by-position panel draws only positions scored at least this many times: per-token losses spread about
# 2 nats, so a mean of 100 has a standard error near 0.2 nats, and the mean of a handful (positions before
# context - stride come only from documents' first windows) is noise.
MIN_TOKENS_PER_POSITION = 100


def table(results: dict) -> str:
    """The short table `llm-ray eval` prints and eval.md opens with."""

    def row(name: str, key: str, fmt: str) -> str:
        r = results[key]
        lo, hi = r["ci95"]
        return f"| {name} | {r['value']:{fmt}} | [{lo:{fmt}}, {hi:{fmt}}] |"

    lines = [f"evaluation of {results['checkpoint']}",
             f"{results['documents']} documents, {results['tokens']:,} tokens, {results['bytes']:,} bytes "
             f"({results['split'] or results['documents_from']}); context {results['context']}, "
             f"stride {results['stride']}",
             "", "| metric | value | 95% interval (bootstrap over documents) |", "|---|---|---|",
             row("loss (nats/token)", "loss", ".4f"), row("perplexity", "perplexity", ".2f"),
             row("bits per byte", "bits_per_byte", ".4f")]
    c = results.get("continuation")
    if c and c.get("documents"):
        lines += ["", f"continuation of {c['documents']} documents ({c['settings']['prompt_tokens']} prompt tokens, "
                  f"{c['settings']['continuation_tokens']} generated): BLEU {c['bleu']:.2f}, ROUGE-1 {c['rouge1']:.3f}, "
                  f"ROUGE-2 {c['rouge2']:.3f}, ROUGE-L {c['rougeL']:.3f}"]
    k = results.get("contamination")
    if k:
        lines += ["", f"contamination: {k['contaminated']} of {k['documents']} documents ({k['share']:.1%}) share more "
                  f"than {k['threshold']:.0%} of their {k['ngram']}-grams with the training split "
                  f"(mean overlap {k['mean_overlap']:.2%})"]
    b = results.get("bias")
    if b:
        lines += ["", f"bias probe ({b['pairs_from']}, {b['pairs']} pairs): share of pairs where the model prefers the "
                  "more stereotyping sentence (0.5 is no preference)", "",
                  "| bias type | pairs | share | 95% interval (bootstrap over pairs) | mean log-likelihood gap |",
                  "|---|---|---|---|---|"]
        for name, r in [*b["by_category"].items(), ("all", b["overall"])]:
            lo, hi = r["ci95"]
            lines.append(f"| {name} | {r['pairs']} | {r['stereotype_share']:.3f} | [{lo:.3f}, {hi:.3f}] | "
                         f"{r['mean_gap']:+.3f} |")
    return "\n".join(lines)


def loss_by_position(sums: dict, min_tokens: int = MIN_TOKENS_PER_POSITION) -> dict:
    """The positions of the context scored at least min_tokens times, with their mean loss and token count: what
    eval.json records and the panel draws."""
    count = sums["position_count"].sum(axis=0)  # (context,)
    shown = np.flatnonzero(count >= min_tokens)
    return {"min_tokens": min_tokens, "positions_scored": int((count > 0).sum()), "position": shown.tolist(),
            "loss": (sums["position_nll"].sum(axis=0)[shown] / count[shown]).tolist(),
            "tokens": count[shown].tolist()}


def write_report(results: dict, sums: dict, history: list[dict], out: Location) -> None:
    out.mkdir()
    (out / "eval.json").write_json({**results, "loss_by_position": loss_by_position(sums)})
    md = ["# Evaluation", "", table(results), ""]
    c = results.get("continuation") or {}
    for s in c.get("samples", []):
        md += [f"## {s['document']}", "", f"**prompt** {s['prompt']!r}", "", f"**reference** {s['reference']!r}", "",
               f"**generated** {s['generated']!r}", ""]
    for item in (results.get("contamination") or {}).get("listed", []):
        md.append(f"- contaminated: {item['document']} ({item['overlap']:.1%} of its n-grams)")
    md += ["", "CIDEr is not reported: it is a captioning metric (agreement with several human captions of an "
           "image) and does not apply to a text-only language model."]
    (out / "eval.md").write_text("\n".join(md) + "\n")
    (out / "eval.png").write_bytes(plot(results, sums, history))


def plot(results: dict, sums: dict, history: list[dict]) -> bytes:
    """Loss curves, loss by position in the context, loss by document length, bits per byte (PNG bytes).

    The words of every panel also go into the PNG's Description: alt text for whoever reads the file without
    seeing it, and what a test reads back."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="." if key == "val_loss" else None, label=label)
    ax.set(title="loss during training", xlabel="step", ylabel="nats/token")
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training history recorded", ha="center", va="center", transform=ax.transAxes)
    ax = axes[0, 1]
    context = sums["position_count"].shape[1]
    shown = loss_by_position(sums)
    ax.set(title=f"loss by position in the context\n(positions with ≥ {shown['min_tokens']} scored tokens: "
           f"{len(shown['position'])} of {context})", xlabel="position", ylabel="nats/token", xlim=(0, context - 1))
    ax.title.set_fontsize(10)
    if shown["position"]:
        by_position = np.full(context, np.nan)  # gaps stay gaps
        by_position[shown["position"]] = shown["loss"]
        ax.plot(np.arange(context), by_position, marker="." if len(shown["position"]) < 20 else None)
    else:
        most = int(sums["position_count"].sum(axis=0).max(initial=0))
        ax.text(0.5, 0.5, f"no position has {shown['min_tokens']} scored tokens\n(the most at one position: {most})",
                ha="center", va="center", transform=ax.transAxes)
    ax = axes[1, 0]
    per_doc = sums["nll_sum"] / np.maximum(1, sums["tokens"])
    ax.scatter(sums["tokens"], per_doc, s=8, alpha=0.6)
    ax.set(title="loss by document length", xlabel="tokens (log scale)", ylabel="nats/token", xscale="log")
    ax = axes[1, 1]
    bpb = results["bits_per_byte"]  # one number: written with its interval, not drawn as a bar
    lo, hi = bpb["ci95"]
    ax.axis("off")
    ax.set(title="bits per byte")
    ax.text(0.5, 0.5, f"{bpb['value']:.4f}\n95% interval [{lo:.4f}, {hi:.4f}]\n(bootstrap over "
            f"{len(sums['tokens'])} documents)", ha="center", va="center", fontsize=14, transform=ax.transAxes)
    for a in axes.ravel():
        a.grid(alpha=0.3)
    fig.tight_layout()
    description = " | ".join(" ".join([a.get_title(), *(t.get_text() for t in a.texts)]) for a in axes.ravel())
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png", metadata={"Description": description.replace("\n", " ")})
    plt.close(fig)
    return buffer.getvalue()
