"""prepare_report.png: the funnel (documents, bytes) on top; duplicate cluster sizes, language shares
and document lengths below (see data.funnel for the numbers)."""

from __future__ import annotations

import io

from llm_ray.data.funnel import KEPT, cluster_bin_label, human_size, language_shares, rules_by_size


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


def _rules_text(by_rule: dict, top: int = 2) -> str:
    """The biggest quality rules: "too_few_words 4,200, symbols 900 +4 more"."""
    ranked = rules_by_size(by_rule)
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
        ax.text(top * 0.01, y, human_size(s["bytes"]), va="center", fontsize=8, color="white", fontweight="bold")
        gone = s["dropped_bytes"] or 0
        if gone > 0:
            ax.barh(y, gone, left=s["bytes"], color=GONE)
        if gone:  # negative when redaction tags outgrow what they replaced
            since = f"\n(since {s['bytes_since']})" if "bytes_since" in s else ""
            ax.text(s["bytes"] + max(gone, 0) + top * 0.02, y, ("-" if gone > 0 else "+") + human_size(abs(gone)) + since,
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


def _plot_clusters(ax, histogram: list, largest: int) -> None:
    title = "duplicate clusters by size (documents)"
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
