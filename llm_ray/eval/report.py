"""The evaluation report: eval.json (every figure), eval.md (a table to read), eval.png (plots)."""

from __future__ import annotations

import io

import numpy as np

from llm_ray.storage import Location


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
    return "\n".join(lines)


def write_report(results: dict, sums: dict, history: list[dict], out: Location) -> None:
    out.mkdir()
    (out / "eval.json").write_json(results)
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
    """Loss curves, loss by position in the context, loss by document length, bits per byte (PNG bytes)."""
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
    ax.legend()
    ax = axes[0, 1]
    count = sums["position_count"].sum(axis=0)
    by_position = np.divide(sums["position_nll"].sum(axis=0), count, out=np.full(len(count), np.nan), where=count > 0)
    ax.plot(np.arange(len(count)), by_position)
    ax.set(title="loss by position in the context", xlabel="position", ylabel="nats/token")
    ax = axes[1, 0]
    per_doc = sums["nll_sum"] / np.maximum(1, sums["tokens"])
    ax.scatter(sums["tokens"], per_doc, s=8, alpha=0.6)
    ax.set(title="loss by document length", xlabel="tokens (log scale)", ylabel="nats/token", xscale="log")
    ax = axes[1, 1]
    bpb = results["bits_per_byte"]
    ax.bar(["bits per byte"], [bpb["value"]], yerr=[[bpb["value"] - bpb["ci95"][0]], [bpb["ci95"][1] - bpb["value"]]],
           capsize=8, color="tab:green")
    ax.set(title="bits per byte, 95% interval")
    for a in axes.ravel():
        a.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png")
    plt.close(fig)
    return buffer.getvalue()
