"""What the documents stage counts, in a form that adds up across chunks, groups and runs.

Every figure is a count, a Counter, a fixed-size histogram or a short list of examples, so the
totals of a corpus of any size fit in a few kilobytes: no task sends anything per document to the
driver, and the stage record (``_stage.json``) stays small.
"""

from __future__ import annotations

import math
from collections import Counter

from llm_ray.memory import peak_private_rss_bytes

LENGTH_BINS = 32  # bin i holds documents of 2^i to 2^(i+1) - 1 characters (bin 0 also holds empty ones)
EXAMPLES = 5  # contamination examples kept


def new_stats() -> dict:
    return {
        "files": 0, "failed": [], "bytes_in": 0,  # bytes_in: the files as stored (compressed or not)
        "docs_in": 0, "text_bytes_in": 0,  # what the files gave, in UTF-8 bytes of text
        "docs_out": 0, "bytes_out": 0,  # what survived every rule (after cleaning)
        "drops": Counter(), "drop_bytes": Counter(),  # per reason: documents and their input bytes
        "notes": Counter(),  # records skipped while reading (invalid_json_line, document_too_large...)
        "pii": Counter(), "pii_chars": 0, "pii_docs": 0, "pii_examples": [],
        "languages": Counter(),  # detected language of every document checked (cleaning.languages set)
        "length_histogram": [0] * LENGTH_BINS,  # characters per kept document, after cleaning
        "contamination_examples": [],
        "chunks": Counter(),  # chunks cleaned now, and reused from an interrupted run
        # task kind -> the largest peak of one such task, and the most one added above its start (task_memory)
        "peak_rss_bytes": {}, "peak_growth_bytes": {},
    }


def length_bin(chars: int) -> int:
    return min(LENGTH_BINS - 1, int(math.log2(chars)) if chars > 0 else 0)


def merge(total: dict, part: dict, pii_examples: int) -> dict:
    """Add part's figures into total (JSON-read parts carry plain dicts for Counters)."""
    for key, value in part.items():
        if key in ("pii_examples", "contamination_examples"):
            room = (pii_examples if key == "pii_examples" else EXAMPLES) - len(total[key])
            total[key] += value[:max(0, room)]
        elif key == "failed":
            total[key] += [list(f) for f in value]
        elif key in ("peak_rss_bytes", "peak_growth_bytes"):
            for kind, peak in value.items():
                total[key][kind] = max(total[key].get(kind, 0), peak)
        elif key == "length_histogram":
            total[key] = [a + b for a, b in zip(total[key], value)]
        elif isinstance(total.get(key), Counter):
            total[key].update(value)
        elif key in total:
            total[key] += value
    return total


def task_memory(kind: str, start_bytes: int) -> dict:
    """This task's peak memory (memory.peak_private_rss_bytes since the task called
    memory.reset_peak_rss), and its growth above start_bytes (memory.private_rss_bytes then), as a part
    for merge. The growth is what the task itself needed: the peak also holds whatever the process
    loaded before (modules, allocator pools), which differs from one worker process to the next."""
    peak = peak_private_rss_bytes()
    return {"peak_rss_bytes": {kind: peak}, "peak_growth_bytes": {kind: max(0, peak - start_bytes)}}
