"""The data report's numbers, plain and tested alone: the funnel of documents and bytes from reading to
the splits (one step per thing that removes documents, with its drop and reason), language shares,
duplicate-cluster bins. They read the stage records only, never anything per document."""

from __future__ import annotations

# Drop reasons the documents stage counts after clean.py's quality rules, in the order the funnel
# shows them; any other reason is a quality rule (so a new rule in clean.py lands there unnamed here).
LATER_FILTERS = (("after PII", "pii"), ("after language", "language"), ("after contamination", "contamination"))
QUALITY = "quality rules"
KEPT = "after near dedup (kept)"
TOP_LANGUAGES = 8
FUNNEL_BYTES = ("UTF-8 bytes of text: as read through the filters (bytes of the surviving documents before "
                "cleaning), after cleaning from 'cleaned text' on; null where no record says")


def funnel(docs: dict, dedup: dict, manifest: dict) -> list[dict]:
    """One dict per step: documents and bytes after it, what it dropped (documents, bytes) and why.
    Each step's documents are the previous step's minus its dropped_documents."""
    drops, drop_bytes = docs["drops"], docs["drop_bytes"]

    def dropped_bytes(reasons) -> int:
        return sum(drop_bytes.get(r, 0) for r in reasons)

    steps = [{**_step("read", docs["docs_in"], docs["text_bytes_in"], 0, 0, None), "files": docs["files"],
              "files_failed": len(docs["failed"]), "stored_bytes": docs["bytes_in"]}]
    rules = sorted(r for r in drops if r not in {reason for _, reason in LATER_FILTERS})
    steps.append(_after(steps, "after quality rules", sum(drops[r] for r in rules), dropped_bytes(rules), QUALITY))
    steps[-1]["by_rule"] = {r: {"documents": drops[r], "bytes": dropped_bytes([r])} for r in rules}
    for name, reason in LATER_FILTERS:
        steps.append(_after(steps, name, drops.get(reason, 0), dropped_bytes([reason]), reason))
    if steps[-1]["documents"] != docs["docs_out"]:  # the record disagrees with itself: show it, don't hide it
        steps.append(_after(steps, "unaccounted", steps[-1]["documents"] - docs["docs_out"], None, "unaccounted"))
    steps.append(_after(steps, "cleaned text", 0, None, "cleaning edits", bytes_after=docs["bytes_out"]))
    steps.append(_after(steps, "after exact dedup", dedup["exact_duplicates"], dedup["exact_duplicate_bytes"],
                        "exact duplicates"))
    steps.append(_after(steps, KEPT, steps[-1]["documents"] - dedup["docs_out"], None, "near duplicates",
                        bytes_after=dedup["bytes_out"]))
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


def human_size(n: int | None) -> str:
    """Bytes for people: 1.2 MB; "?" when unknown."""
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def rules_by_size(by_rule: dict) -> list[tuple[str, dict]]:
    return sorted(by_rule.items(), key=lambda kv: (-kv[1]["documents"], kv[0]))
