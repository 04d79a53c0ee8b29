"""The data report: prepare_report.json and .md, and prepare_report.png.

Everything here reads the stage records (counts, per-reason drops, fixed-size histograms, a few
examples), never anything per document, so a report costs the same for 16 documents or a billion.
The funnel follows the documents and their bytes from reading to the splits, one step per thing
that removes documents, each with its drop and reason; the picture shows the same funnel, the sizes
of duplicate clusters, the language shares and the document lengths.
"""

from __future__ import annotations

import io

from llm_ray.storage import Location

# Drop reasons the documents stage counts after clean.py's quality rules, in the order the funnel
# shows them; any other reason is a quality rule (so a new rule in clean.py lands there unnamed here).
LATER_FILTERS = (("after PII", "pii"), ("after language", "language"), ("after contamination", "contamination"))
QUALITY = "quality rules"
KEPT = "after near dedup (kept)"
TOP_LANGUAGES = 8
FUNNEL_BYTES = ("UTF-8 bytes of text: as read through the filters (bytes of the surviving documents before "
                "cleaning), after cleaning from 'cleaned text' on; null where no record says")


# ---------------------------------------------------------------- the funnel (plain: tested alone)


def funnel(docs: dict, dedup: dict, manifest: dict) -> list[dict]:
    """One dict per step: documents and bytes after it, what it dropped (documents, bytes) and why.
    Each step's documents are the previous step's minus its dropped_documents."""
    drops, drop_bytes = docs.get("drops", {}), docs.get("drop_bytes")

    def dropped_bytes(reasons) -> int | None:  # old records have no drop_bytes
        return None if drop_bytes is None else sum(drop_bytes.get(r, 0) for r in reasons)

    steps = [{**_step("read", docs["docs_in"], docs.get("text_bytes_in"), 0, 0, None), "files": docs.get("files", 0),
              "files_failed": len(docs.get("failed", [])), "stored_bytes": docs.get("bytes_in")}]
    rules = sorted(r for r in drops if r not in {reason for _, reason in LATER_FILTERS})
    steps.append(_after(steps, "after quality rules", sum(drops[r] for r in rules), dropped_bytes(rules), QUALITY))
    steps[-1]["by_rule"] = {r: {"documents": drops[r], "bytes": dropped_bytes([r])} for r in rules}
    for name, reason in LATER_FILTERS:
        steps.append(_after(steps, name, drops.get(reason, 0), dropped_bytes([reason]), reason))
    if steps[-1]["documents"] != docs["docs_out"]:  # the record disagrees with itself: show it, don't hide it
        steps.append(_after(steps, "unaccounted", steps[-1]["documents"] - docs["docs_out"], None, "unaccounted"))
    steps.append(_after(steps, "cleaned text", 0, None, "cleaning edits", bytes_after=docs.get("bytes_out")))
    steps.append(_after(steps, "after exact dedup", dedup["exact_duplicates"], dedup.get("exact_duplicate_bytes"),
                        "exact duplicates"))
    steps.append(_after(steps, KEPT, steps[-1]["documents"] - dedup["docs_out"], None, "near duplicates",
                        bytes_after=dedup.get("bytes_out")))
    in_splits = {name: n for name, n in manifest["documents"].items() if n}
    steps.append(_after(steps, "splits", steps[-1]["documents"] - sum(in_splits.values()), None, "not in a split"))
    steps[-1].update(splits=in_splits, tokens={k: s["tokens"] for k, s in manifest["splits"].items()})
    return steps


def _step(name: str, documents: int, size: int | None, dropped: int, dropped_size: int | None, reason) -> dict:
    return {"step": name, "documents": documents, "bytes": size, "dropped_documents": dropped,
            "dropped_bytes": dropped_size, "reason": reason}


def _after(steps: list[dict], name: str, dropped: int, dropped_size: int | None, reason: str,
           bytes_after: int | None = None) -> dict:
    """The step after steps[-1]. Bytes come from dropped_size when given, else from bytes_after; a
    drop measured against an earlier step (the one before was unknown) names it in bytes_since."""
    prev = steps[-1]
    if dropped_size is not None:
        size = None if prev["bytes"] is None else prev["bytes"] - dropped_size
        return _step(name, prev["documents"] - dropped, size, dropped, dropped_size if size is not None else None,
                     reason)
    step = _step(name, prev["documents"] - dropped, bytes_after, dropped, None, reason)
    known = [s for s in steps if s["bytes"] is not None]
    if bytes_after is not None and known:
        step["dropped_bytes"] = known[-1]["bytes"] - bytes_after
        if known[-1] is not prev:
            step["bytes_since"] = known[-1]["step"]
    return step


def language_shares(languages: dict, top: int = TOP_LANGUAGES) -> list[tuple[str, int, float]]:
    """(code, documents, share) of the top languages, most documents first, the rest as "other"."""
    total = sum(languages.values())
    ranked = sorted(languages.items(), key=lambda kv: (-kv[1], kv[0]))
    rows = ranked[:top] + ([("other", sum(n for _, n in ranked[top:]))] if len(ranked) > top else [])
    return [(code, n, n / total) for code, n in rows] if total else []


def cluster_bin_label(lower: int) -> str:
    """The power-of-two bin whose lower bound is lower: 2 -> "2", 3 -> "3-4", 5 -> "5-8"."""
    return "2" if lower <= 2 else f"{lower:,}-{2 * lower - 2:,}"


# ---------------------------------------------------------------- the report


def build_report(manifest: dict, docs: dict, dedup: dict, tok: dict, timings: dict, seconds: float) -> dict:
    # "stages": the per-stage view of earlier reports, kept for their readers; "funnel" has it all.
    stages = [{"stage": name, "docs_in": d_in, "docs_out": d_out, "bytes_in": b_in, "bytes_out": b_out,
               "seconds": timings.get(timed) if timed else None}
              for name, d_in, d_out, b_in, b_out, timed in (
                  ("read", None, docs["docs_in"], docs["bytes_in"], None, None),
                  ("clean + filter", docs["docs_in"], docs["docs_out"], None, docs["bytes_out"], "documents"),
                  ("dedup", dedup["docs_in"], dedup["docs_out"], None, dedup.get("bytes_out"), "dedup"))]
    report = {
        "funnel": funnel(docs, dedup, manifest),
        "funnel_bytes": FUNNEL_BYTES,
        "files": {"read": docs["files"], "failed": docs["failed"]},
        "stages": stages,
        "drops": dict(sorted(docs["drops"].items())),
        "drop_bytes": dict(sorted(docs.get("drop_bytes", {}).items())),
        "pii": {"redacted": dict(sorted(docs.get("pii", {}).items())), "characters": docs.get("pii_chars", 0),
                "documents": docs.get("pii_docs", 0), "examples": docs.get("pii_examples", [])},
        "notes": dict(sorted(docs["notes"].items())),
        "languages": dict(sorted(docs.get("languages", {}).items(), key=lambda kv: (-kv[1], kv[0]))),
        "contamination_examples": docs.get("contamination_examples", []),
        "length_histogram": list(docs.get("length_histogram", [])),
        "dedup": {**{k: dedup[k] for k in ("exact_duplicates", "near_duplicate_pairs", "clusters_with_copies",
                                           "largest_cluster", "lsh_bands", "lsh_rows", "example_pairs")},
                  # absent from older records: None says "not recorded", not zero
                  "candidate_edges": dedup.get("candidate_edges"),
                  "cluster_size_histogram": dedup.get("cluster_size_histogram")},
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


def _size(n: int | None) -> str:
    """Bytes for people: 1.2 MB; "?" when unknown."""
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _drop_text(s: dict) -> str:
    """What a step removed: "language: -1,234 docs / -5.6 MB"."""
    parts = [f"-{s['dropped_documents']:,} docs"] if s["dropped_documents"] else []
    if s["dropped_bytes"]:  # negative when redaction tags outgrow what they replaced
        since = f" (since {s['bytes_since']})" if "bytes_since" in s else ""
        parts.append(("-" if s["dropped_bytes"] > 0 else "+") + _size(abs(s["dropped_bytes"])) + since)
    return f"{s['reason']}: " + " / ".join(parts) if parts else ""


def _funnel_lines(r: dict) -> list[str]:
    lines = [f"{'funnel':<26}{'documents':>12}{'bytes':>11}  dropped"]
    for s in r["funnel"]:
        if s["step"] == "read":
            note = f"{s['files']:,} files ({s['files_failed']} failed), {_size(s['stored_bytes'])} as stored"
        elif s["step"] == "splits":
            note = " · ".join(f"{k} {v:,}" for k, v in s["splits"].items()) + (
                f"; {_drop_text(s)}" if s["dropped_documents"] else "")
        else:
            note = _drop_text(s)
        size = "-" if s["step"] == "splits" else _size(s["bytes"])
        lines.append(f"{s['step']:<26}{s['documents']:>12,}{size:>11}  {note}".rstrip())
        for rule, d in _by_size(s.get("by_rule", {})):
            gone = f"-{d['documents']:,}" + ("" if d["bytes"] is None else f" / -{_size(d['bytes'])}")
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
    candidates = "" if d["candidate_edges"] is None else f" of {d['candidate_edges']:,} candidate edges"
    lines.append(f"duplicates: {d['exact_duplicates']:,} exact copies, {d['near_duplicate_pairs']:,} near "
                 f"edges{candidates}, {d['clusters_with_copies']:,} clusters with copies "
                 f"(largest {d['largest_cluster']:,})")
    hist = d["cluster_size_histogram"]
    lines.append("cluster sizes: " + ("not recorded" if hist is None else "none" if not any(c for _, c in hist)
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


# ---------------------------------------------------------------- the picture


def plot(report: dict) -> bytes:
    """The report's picture as PNG bytes: the funnel (documents, bytes) on top; duplicate cluster
    sizes, language shares and document lengths below."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    # Constrained layout (tight_layout cannot fit the long step names); a subfigure per row, so
    # that the margins of one row's panels do not open gaps between the other's.
    fig = plt.figure(figsize=(12, 8), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.3, 1])
    docs_ax, bytes_ax = top.subplots(1, 2, sharey=True, width_ratios=[2.6, 1])
    _plot_funnel(docs_ax, bytes_ax, report["funnel"])
    clusters_ax, languages_ax, lengths_ax = bottom.subplots(1, 3, width_ratios=[1.3, 1, 1])
    d = report["dedup"]
    _plot_clusters(clusters_ax, d["cluster_size_histogram"], d["largest_cluster"])
    _plot_languages(languages_ax, report["languages"], report["drops"].get("language", 0))
    _plot_lengths(lengths_ax, report["length_histogram"])
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png")
    plt.close(fig)
    return buffer.getvalue()


KEEP, GONE, NOTE = "#4c72b0", "#e8a0a0", "#a33"  # survivors, what a step dropped, drop labels


def _shown(steps: list[dict]) -> tuple[list[dict], list[str]]:
    """The steps worth a bar (read, those that dropped something, cleaned text, kept, splits) and the
    names of those that dropped nothing (said in one line rather than drawn)."""
    always = {"read", "cleaned text", KEPT, "splits"}
    shown = [s for s in steps if s["step"] in always or s["dropped_documents"]]
    idle = [s["reason"] for s in steps if s not in shown and s["reason"]]
    return shown, idle


def _plot_funnel(ax, bytes_ax, steps: list[dict]) -> None:
    shown, idle = _shown(steps)
    top = max(1, steps[0]["documents"])
    for y, s in enumerate(shown):
        if s["step"] == "splits":
            _split_bar(ax, y, s)
        else:
            ax.barh(y, s["documents"], color=KEEP)
        ax.text(top * 0.01, y, f"{s['documents']:,}", va="center", fontsize=8, color="white", fontweight="bold")
        if s["dropped_documents"] > 0 and s["step"] != "splits":
            ax.barh(y, s["dropped_documents"], left=s["documents"], color=GONE)
            share = s["dropped_documents"] / top
            label = f"-{s['dropped_documents']:,} {s['reason']} ({'<0.1%' if share < 0.001 else f'{share:.1%}'})"
            ax.text(s["documents"] + s["dropped_documents"] + top * 0.01, y, label, va="center", fontsize=8,
                    color=NOTE)
            if s.get("by_rule"):  # the biggest rules, in small print under the bar's label
                ax.text(s["documents"] + s["dropped_documents"] + top * 0.01, y + 0.28, _rules_text(s["by_rule"]),
                        va="center", fontsize=7, color=NOTE)
        elif s["step"] == "cleaned text":
            ax.text(s["documents"] + top * 0.01, y, "text edits only (see bytes)", va="center", fontsize=8,
                    color="gray")
        elif s["step"] == "splits":
            ax.text(s["documents"] + top * 0.01, y, " · ".join(f"{k} {v:,}" for k, v in s["splits"].items()),
                    va="center", fontsize=8)
    ax.set_yticks(range(len(shown)), [s["step"] for s in shown], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.75)  # room on the right for the drop labels
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:,.0f}")
    ax.set_xlabel("documents" + ("\nnothing dropped by: " + ", ".join(idle) if idle else ""), fontsize=9)
    ax.set_title("documents through prepare (red: dropped at that step)", fontsize=10)
    _bytes_funnel(bytes_ax, shown)


def _by_size(by_rule: dict) -> list[tuple[str, dict]]:
    return sorted(by_rule.items(), key=lambda kv: (-kv[1]["documents"], kv[0]))


def _rules_text(by_rule: dict, top: int = 2) -> str:
    """The biggest quality rules: "too_few_words 4,200, symbols 900 +4 more"."""
    ranked = _by_size(by_rule)
    more = f" +{len(ranked) - top} more" if len(ranked) > top else ""
    return ", ".join(f"{r} {d['documents']:,}" for r, d in ranked[:top]) + more


def _split_bar(ax, y: int, s: dict) -> None:
    left = 0
    for i, (name, n) in enumerate(s["splits"].items()):
        ax.barh(y, n, left=left, color=("#55a868", "#dd8452", "#8172b3")[i % 3])
        left += n


def _bytes_funnel(ax, shown: list[dict]) -> None:
    top = max([s["bytes"] for s in shown if s["bytes"]] + [1])
    for y, s in enumerate(shown):
        if s["step"] == "splits":
            tokens = sum(s["tokens"].values())
            ax.text(top * 0.01, y, f"{tokens:,} tokens", va="center", fontsize=8)
            continue
        if s["bytes"] is None:
            ax.text(top * 0.01, y, "not recorded", va="center", fontsize=8, color="gray")
            continue
        ax.barh(y, s["bytes"], color=KEEP)
        ax.text(top * 0.01, y, _size(s["bytes"]), va="center", fontsize=8, color="white", fontweight="bold")
        gone = s["dropped_bytes"] or 0
        if gone > 0:
            ax.barh(y, gone, left=s["bytes"], color=GONE)
        if gone:  # negative when redaction tags outgrow what they replaced
            since = f"\n(since {s['bytes_since']})" if "bytes_since" in s else ""
            ax.text(s["bytes"] + max(gone, 0) + top * 0.02, y, ("-" if gone > 0 else "+") + _size(abs(gone)) + since,
                    va="center", fontsize=8 if not since else 7, color=NOTE)
    ax.tick_params(axis="y", left=False, labelleft=False)
    ax.set_xlim(0, top * 1.45)
    ax.set_xticks([])  # the bars carry their figures
    ax.set_xlabel("UTF-8 bytes of text")
    ax.set_title("bytes", fontsize=10)


def _empty(ax, title: str, message: str) -> None:
    """A panel with nothing to plot says why in words, not with an empty axis."""
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=10, color="gray")


def _plot_clusters(ax, histogram: list | None, largest: int) -> None:
    title = "duplicate clusters by size (documents)"
    if histogram is None:
        return _empty(ax, title, "cluster sizes not recorded\n(dedup record from an older version)")
    if not any(c for _, c in histogram):
        return _empty(ax, title, "no duplicate clusters")
    counts = [c for _, c in histogram]
    bars = ax.bar(range(len(counts)), counts, color=KEEP)
    ax.bar_label(bars, [f"{c:,}" if c else "" for c in counts], fontsize=7)
    ax.set_xticks(range(len(counts)), [cluster_bin_label(lo) for lo, _ in histogram], rotation=45, ha="right",
                  fontsize=8)
    if max(counts) > 50 * min(c for c in counts if c):  # a few huge clusters next to thousands of pairs
        ax.set_yscale("log")
    ax.set_ylabel("clusters")
    ax.set_title(f"{title}\n{sum(counts):,} clusters, largest {largest:,} documents", fontsize=10)


def _plot_languages(ax, languages: dict, dropped: int) -> None:
    title = "languages of the documents checked"
    shares = language_shares(languages)
    if not shares:
        return _empty(ax, title, "language filter off\n(cleaning.languages not set)")
    bars = ax.barh(range(len(shares)), [share for _, _, share in shares], color=KEEP)
    ax.bar_label(bars, [f"{share:.1%} ({n:,})" for _, n, share in shares], fontsize=8, padding=2)
    ax.set_yticks(range(len(shares)), [code for code, _, _ in shares], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.45)  # room for the labels
    ax.set_xticks([0, 0.5, 1], ["0", "50%", "100%"])
    ax.set_title(f"{title}\n{dropped:,} dropped by the language filter", fontsize=10)


def _plot_lengths(ax, histogram: list[int]) -> None:
    title = "document length after cleaning"
    used = [i for i, c in enumerate(histogram) if c]
    if not used:
        return _empty(ax, title, "no documents kept" if histogram else "not recorded")
    bins = range(used[0], used[-1] + 1)
    ax.bar(range(len(bins)), [histogram[i] for i in bins], color=KEEP)
    step = max(1, len(bins) // 6)  # at most ~7 labels
    ax.set_xticks(range(0, len(bins), step), [_chars(i) for i in bins[::step]], fontsize=8)
    ax.set_xlabel("characters (power-of-two bins)")
    ax.yaxis.set_major_formatter(lambda x, _: f"{x:,.0f}")
    ax.set_ylabel("documents")
    ax.set_title(title, fontsize=10)


def _chars(power: int) -> str:
    """2 ** power characters, short: 512, 4k, 2M."""
    return f"{2 ** (power - 20)}M" if power >= 20 else f"{2 ** (power - 10)}k" if power >= 10 else str(2 ** power)
