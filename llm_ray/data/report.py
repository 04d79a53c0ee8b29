"""The data report: prepare_report.json and .md, and a PNG of length histograms."""

from __future__ import annotations

import io

import numpy as np

from llm_ray.storage import Location


def build_report(manifest: dict, docs: dict, dedup: dict, tok: dict, timings: dict, seconds: float) -> dict:
    splits = manifest["splits"]
    stages = [
        {"stage": "read", "docs_in": None, "docs_out": docs["docs_in"], "bytes_in": docs["bytes_in"],
         "bytes_out": None, "seconds": None},
        {"stage": "clean + filter", "docs_in": docs["docs_in"], "docs_out": docs["docs_out"],
         "bytes_in": None, "bytes_out": docs["bytes_out"], "seconds": timings.get("documents")},
        {"stage": "dedup", "docs_in": dedup["docs_in"], "docs_out": dedup["docs_out"], "bytes_in": None,
         "bytes_out": None, "seconds": timings.get("dedup")},
    ]
    report = {
        "files": {"read": docs["files"], "failed": docs["failed"]},
        "stages": stages,
        "drops": dict(sorted(docs["drops"].items())),
        "pii": {"redacted": dict(sorted(docs.get("pii", {}).items())), "characters": docs.get("pii_chars", 0),
                "documents": docs.get("pii_docs", 0), "examples": docs.get("pii_examples", [])},
        "notes": dict(sorted(docs["notes"].items())),
        "dedup": {k: dedup[k] for k in ("exact_duplicates", "near_duplicate_pairs", "clusters_with_copies",
                                        "largest_cluster", "lsh_bands", "lsh_rows", "example_pairs")},
        "splits": {name: {"documents": manifest["documents"].get(name, 0), "blocks": s["blocks"],
                          "tokens": s["tokens"]} for name, s in splits.items()},
        "tokenizer": {"vocab_size": tok["vocab_size"], "fertility_tokens_per_word": round(tok["fertility"], 3),
                      "bytes_per_token": round(tok["bytes_per_token"], 3)},
        "unigram_val_loss": manifest["unigram_val_loss"],
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
        "total_seconds": round(seconds, 2),
    }
    report["table"] = format_table(report)
    return report


def _n(value) -> str:
    return "-" if value is None else f"{value:,}"


def format_table(r: dict) -> str:
    lines = ["", "prepare report", f"{'stage':<16}{'docs in':>12}{'docs out':>12}{'MB in':>10}{'MB out':>10}{'s':>8}"]
    for s in r["stages"]:
        mb_in = "-" if s["bytes_in"] is None else f"{s['bytes_in'] / 1e6:.1f}"
        mb_out = "-" if s["bytes_out"] is None else f"{s['bytes_out'] / 1e6:.1f}"
        sec = "-" if s["seconds"] is None else f"{s['seconds']:.1f}"
        lines.append(f"{s['stage']:<16}{_n(s['docs_in']):>12}{_n(s['docs_out']):>12}{mb_in:>10}{mb_out:>10}{sec:>8}")
    if r["files"]["failed"]:
        lines.append(f"files failed: {len(r['files']['failed'])} (listed in prepare_report.json)")
    if r["drops"]:
        lines.append("dropped by rule: " + ", ".join(f"{k} {v}" for k, v in r["drops"].items()))
    if r["notes"]:
        lines.append("notes: " + ", ".join(f"{k} {v}" for k, v in r["notes"].items()))
    p = r["pii"]
    if p["redacted"]:
        lines.append("redacted: " + ", ".join(f"{k} {v}" for k, v in p["redacted"].items())
                     + f" in {p['documents']} documents ({p['characters']:,} characters)")
    d = r["dedup"]
    lines.append(f"duplicates: {d['exact_duplicates']} exact, {d['near_duplicate_pairs']} near pairs, "
                 f"{d['clusters_with_copies']} clusters with copies (largest {d['largest_cluster']})")
    lines.append("splits: " + ", ".join(f"{k} {v['documents']} docs / {v['tokens']:,} tokens"
                                        for k, v in r["splits"].items()))
    t = r["tokenizer"]
    lines.append(f"tokenizer: {t['vocab_size']} tokens, {t['fertility_tokens_per_word']} tokens/word, "
                 f"{t['bytes_per_token']} bytes/token; unigram baseline {r['unigram_val_loss']:.3f} nats/token")
    lines.append(f"total {r['total_seconds']:.1f} s")
    return "\n".join(lines)


def write_report(report: dict, docs: dict, tok: dict, out: Location) -> None:
    (out / "prepare_report.json").write_json(report)
    md = ["# prepare report", "", "```", report["table"].strip(), "```", ""]
    if report["dedup"]["example_pairs"]:
        md += ["## Example near-duplicate pairs", "", "| document | document | est. Jaccard |", "| --- | --- | --- |"]
        md += [f"| {a} | {b} | {p['estimated_jaccard']} |"
               for p in report["dedup"]["example_pairs"] for a, b in [p["documents"]]]
        md.append("")
    if report["pii"]["examples"]:
        md += ["## Redacted personal data (examples, shown redacted)", ""]
        md += ["- `" + e.replace("`", "'") + "`" for e in report["pii"]["examples"]] + [""]
    if report["files"]["failed"]:
        md += ["## Files that could not be read", ""] + [f"- `{u}`: {w}" for u, w in report["files"]["failed"]] + [""]
    md.append("![histograms](prepare_report.png)")
    (out / "prepare_report.md").write_text("\n".join(md) + "\n")
    (out / "prepare_report.png").write_bytes(_plot(docs["doc_chars"], tok["val_tokens_per_doc"]))


def _plot(doc_chars: list[int], tokens_per_doc: list[int]) -> bytes:
    """The histograms as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, values, title in ((axes[0], doc_chars, "document length (characters, after cleaning)"),
                              (axes[1], tokens_per_doc, "tokens per document (validation split)")):
        if values:
            bins = np.logspace(np.log10(max(1, min(values))), np.log10(max(values) + 1), 40)
            ax.hist(values, bins=bins)
            ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("documents")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png")
    plt.close(fig)
    return buffer.getvalue()
