"""The data report: prepare_report.json and .md, and prepare_report.png.

Everything here reads the stage records (counts, per-reason drops, fixed-size histograms, a few
examples), never anything per document, so a report costs the same for 16 documents or a billion.
The funnel follows the documents and their bytes from reading to the splits, one step per thing
that removes documents, each with its drop and reason; the picture shows the same funnel, the sizes
of duplicate clusters, the language shares and the document lengths.
"""

from __future__ import annotations

from llm_ray.data.funnel import FUNNEL_BYTES, cluster_bin_label, funnel, human_size, language_shares, rules_by_size
from llm_ray.data.report_figure import plot
from llm_ray.storage import Location


# ---------------------------------------------------------------- the report


def build_report(manifest: dict, docs: dict, dedup: dict, tok: dict, timings: dict, seconds: float) -> dict:
    report = {
        "funnel": funnel(docs, dedup, manifest),
        "funnel_bytes": FUNNEL_BYTES,
        "files": {"read": docs["files"], "failed": docs["failed"]},
        "drops": dict(sorted(docs["drops"].items())),
        "drop_bytes": dict(sorted(docs["drop_bytes"].items())),
        "pii": {"redacted": dict(sorted(docs["pii"].items())), "characters": docs["pii_chars"],
                "documents": docs["pii_docs"], "examples": docs["pii_examples"]},
        "notes": dict(sorted(docs["notes"].items())),
        "languages": dict(sorted(docs["languages"].items(), key=lambda kv: (-kv[1], kv[0]))),
        "contamination_examples": docs["contamination_examples"],
        "length_histogram": list(docs["length_histogram"]),
        "dedup": {**{k: dedup[k] for k in ("exact_duplicates", "near_duplicate_pairs", "clusters_with_copies",
                                           "largest_cluster", "lsh_bands", "lsh_rows", "example_pairs",
                                           "candidate_edges", "cluster_size_histogram")}},
        "splits": {name: {"documents": manifest["documents"].get(name, 0), "blocks": s["blocks"],
                          "tokens": s["tokens"]} for name, s in manifest["splits"].items()},
        "tokenizer": {"vocab_size": tok["vocab_size"], "fertility_tokens_per_word": round(tok["fertility"], 3),
                      "bytes_per_token": round(tok["bytes_per_token"], 3)},
        "unigram_val_loss": manifest["unigram_val_loss"],
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
        "total_seconds": round(seconds, 2),
    }
    report["table"] = format_table(report)
    return report


def _drop_text(s: dict) -> str:
    """What a step removed: "language: -1,234 docs / -5.6 MB"."""
    parts = [f"-{s['dropped_documents']:,} docs"] if s["dropped_documents"] else []
    if s["dropped_bytes"]:  # negative when redaction tags outgrow what they replaced
        since = f" (since {s['bytes_since']})" if "bytes_since" in s else ""
        parts.append(("-" if s["dropped_bytes"] > 0 else "+") + human_size(abs(s["dropped_bytes"])) + since)
    return f"{s['reason']}: " + " / ".join(parts) if parts else ""


def _funnel_lines(r: dict) -> list[str]:
    lines = [f"{'funnel':<26}{'documents':>12}{'bytes':>11}  dropped"]
    for s in r["funnel"]:
        if s["step"] == "read":
            note = f"{s['files']:,} files ({s['files_failed']} failed), {human_size(s['stored_bytes'])} as stored"
        elif s["step"] == "splits":
            note = " · ".join(f"{k} {v:,}" for k, v in s["splits"].items()) + (
                f"; {_drop_text(s)}" if s["dropped_documents"] else "")
        else:
            note = _drop_text(s)
        size = "-" if s["step"] == "splits" else human_size(s["bytes"])
        lines.append(f"{s['step']:<26}{s['documents']:>12,}{size:>11}  {note}".rstrip())
        for rule, d in rules_by_size(s.get("by_rule", {})):
            gone = f"-{d['documents']:,}" + ("" if d["bytes"] is None else f" / -{human_size(d['bytes'])}")
            lines.append(f"  {rule:<24}{'':>23}  {gone}")
    return lines


def format_table(r: dict) -> str:
    lines = ["", "prepare report", *_funnel_lines(r)]
    if r["files"]["failed"]:
        lines.append(f"files failed: {len(r['files']['failed'])} (listed in prepare_report.json)")
    if r["notes"]:
        lines.append("records skipped while reading: " + ", ".join(f"{k} {v}" for k, v in r["notes"].items()))
    p = r["pii"]
    if p["redacted"]:
        lines.append("redacted: " + ", ".join(f"{k} {v}" for k, v in p["redacted"].items())
                     + f" in {p['documents']} documents ({p['characters']:,} characters)")
    shares = language_shares(r["languages"])
    lines.append("languages: " + (", ".join(f"{c} {share:.1%}" for c, _, share in shares) if shares
                                  else "off (cleaning.languages not set)"))
    if r["contamination_examples"]:
        lines.append(f"contamination examples: {len(r['contamination_examples'])} (in prepare_report.md)")
    d = r["dedup"]
    lines.append(f"duplicates: {d['exact_duplicates']:,} exact copies, {d['near_duplicate_pairs']:,} near "
                 f"edges of {d['candidate_edges']:,} candidate edges, {d['clusters_with_copies']:,} clusters with copies "
                 f"(largest {d['largest_cluster']:,})")
    hist = d["cluster_size_histogram"]
    lines.append("cluster sizes: " + ("none" if not any(c for _, c in hist)
                                      else ", ".join(f"{cluster_bin_label(lo)}: {c:,}" for lo, c in hist if c)))
    lines.append("splits: " + ", ".join(f"{k} {v['documents']:,} docs / {v['tokens']:,} tokens"
                                        for k, v in r["splits"].items()))
    t = r["tokenizer"]
    lines.append(f"tokenizer: {t['vocab_size']} tokens, {t['fertility_tokens_per_word']} tokens/word, "
                 f"{t['bytes_per_token']} bytes/token; unigram baseline {r['unigram_val_loss']:.3f} nats/token")
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings_seconds"].items())
                 + f"; total {r['total_seconds']:.1f} s")
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("`", "'")

    md = ["# prepare report", "", "```", report["table"].strip(), "```", ""]
    if report["dedup"]["example_pairs"]:
        md += ["## Example near-duplicate pairs", "", "| document | document | est. Jaccard |", "| --- | --- | --- |"]
        md += [f"| {cell(a)} | {cell(b)} | {p['estimated_jaccard']} |"
               for p in report["dedup"]["example_pairs"] for a, b in [p["documents"]]]
        md.append("")
    if report["contamination_examples"]:
        md += ["## Documents dropped as contaminated (examples)", "",
               "| document | evaluation document | share of its 13-grams |", "| --- | --- | --- |"]
        md += [f"| {cell(e['document'])} | {cell(e['evaluation_document'])} | {e['share']} |"
               for e in report["contamination_examples"]] + [""]
    if report["pii"]["examples"]:
        md += ["## Redacted personal data (examples, shown redacted)", ""]
        md += ["- `" + e.replace("`", "'") + "`" for e in report["pii"]["examples"]] + [""]
    if report["files"]["failed"]:
        md += ["## Files that could not be read", ""] + [f"- `{u}`: {w}" for u, w in report["files"]["failed"]] + [""]
    md.append("![funnel, duplicate clusters, languages, lengths](prepare_report.png)")
    return "\n".join(md) + "\n"


def write_report(report: dict, out: Location) -> None:
    (out / "prepare_report.json").write_json(report)
    (out / "prepare_report.md").write_text(_markdown(report))
    (out / "prepare_report.png").write_bytes(plot(report))


