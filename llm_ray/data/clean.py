"""Per-document cleaning and quality filters (Gopher, Rae et al. 2021; C4): plain functions, no Ray, no I/O."""

from __future__ import annotations

import itertools
import re
import unicodedata

import numpy as np

from llm_ray.config import CleaningConfig
from llm_ray.data.pii import Redaction, redact
from llm_ray.data.text_units import CJK_RE, INVISIBLE, words

DROP_REASONS: tuple[str, ...] = (
    "too_few_words",
    "too_many_words",
    "mean_word_length",
    "symbol_word_ratio",
    "ellipsis_lines",
    "duplicate_lines",
    "top_2gram",
    "duplicate_5grams",
    "alpha_words",
    "empty",
    "pii",
)

INVISIBLE_RE = re.compile(f"[{INVISIBLE}]")
_LINE_BREAK_RE = re.compile("\r\n?|[\x85\u2028\u2029]")  # NEL, LS and PS are line breaks by definition
_OTHER_SPACE_RE = re.compile(r"[^\S \n\t]")  # NBSP, ideographic space, \v, \f ... (Unicode-aware \s)


def _ascii_table() -> tuple[bytes, bytes]:
    """normalize()'s character rules for ASCII, as a bytes.translate table and deletions:
    the other whitespace (\\v, \\f, \\x1c-\\x1f) becomes a space, other controls and DEL go."""
    to_space, delete = b"", b""
    for c in range(128):
        if chr(c) in "\r\n":
            continue
        out = INVISIBLE_RE.sub("", _OTHER_SPACE_RE.sub(" ", chr(c)))
        if out == " " and c != 32:
            to_space += bytes([c])
        elif out == "":
            delete += bytes([c])
    return bytes.maketrans(to_space, b" " * len(to_space)), delete


_ASCII_TABLE, _ASCII_DELETE = _ascii_table()


def _characters(text: str) -> str:
    """Line breaks to \\n, other whitespace to spaces, control and format characters out, NFC."""
    text = _LINE_BREAK_RE.sub("\n", text)
    text = _OTHER_SPACE_RE.sub(" ", text)
    text = INVISIBLE_RE.sub("", text)
    return unicodedata.normalize("NFC", text)


def _characters_ascii(text: str) -> str:
    """_characters for ASCII text (already NFC): one C-speed pass instead of three regexes."""
    if "\r" in text:
        text = _LINE_BREAK_RE.sub("\n", text)
    return text.encode("ascii").translate(_ASCII_TABLE, _ASCII_DELETE).decode("ascii")


def normalize(text: str) -> str:
    """NFC, no control/format characters, plain spaces and newlines, tidy blank lines."""
    text = _characters_ascii(text) if text.isascii() else _characters(text)
    # Each rule runs only where it can match: a substring test is far cheaper than a regex pass.
    if "\t" in text:  # a run containing a tab stays one tab (columns of a table survive)
        text = re.sub(r"[ \t]*\t[ \t]*", "\t", text)
    if "  " in text:
        text = re.sub(r" {2,}", " ", text)
    if " \n" in text or "\t\n" in text:
        text = re.sub(r"[ \t]+\n", "\n", text)
    if "\n\n\n\n" in text:
        text = re.sub(r"\n{4,}", "\n\n\n", text)  # 3+ blank lines -> 2
    return text.strip()


_GUTENBERG_START_RE = re.compile(
    # "*** START OF THE/THIS PROJECT GUTENBERG EBOOK/ETEXT <title> ***" (the title may wrap onto a
    # second line), and the end of the "small print" that closes pre-2000s headers.
    r"\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)(?:[^*\n]*(?:\n[^*\n]+)?\*{3}|.*)"
    r"|\*END\*?\s*THE SMALL PRINT!.*",
    re.IGNORECASE,
)
_GUTENBERG_END_RE = re.compile(
    # "*** END OF THE PROJECT GUTENBERG EBOOK ...", "End of the Project Gutenberg EBook of ...",
    # "End of Project Gutenberg's ...", "End of this Project Gutenberg Etext ..." at a line start.
    r"^[ \t*]*END OF (?:THE |THIS )?PROJECT GUTENBERG\b",
    re.IGNORECASE | re.MULTILINE,
)
# World Library / Gutenberg notices between the plays of the old Complete Works etext:
# "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM SHAKESPEARE IS COPYRIGHT ...>>".
# Starting with the literal "<<" lets the regex engine skip ahead quickly on long documents.
_LICENSE_RE = re.compile(
    r"<<[^<>]{0,3000}?(?:COPYRIGHT|ELECTRONIC VERSION)[^<>]{0,3000}>>[ \t]*\n*", re.IGNORECASE
)


def strip_boilerplate(text: str) -> str:
    """Remove Project Gutenberg headers, footers and license blocks; other text comes back as is."""
    # The footer first: 2000s files put the old small print after their END line, and its last
    # line must not be taken for the end of a header.
    end = _GUTENBERG_END_RE.search(text)
    out = text[: end.start()] if end else text
    start = _GUTENBERG_START_RE.search(out)
    if start:
        out = out[start.end() :]
    out = _LICENSE_RE.sub("", out)
    return text if out == text else out.strip()


def _duplicate_line_chars(lines: list[str]) -> int:
    """Characters in lines that repeat an earlier identical, non-empty line."""
    seen: set[str] = set()
    dup = 0
    for line in lines:
        if line in seen:
            dup += len(line)
        elif line:
            seen.add(line)
    return dup


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every n-gram of word ids (polynomial, wrapping): one vector pass per word of
    the n-gram. Two distinct n-grams collide with probability ~2^-64, never in practice."""
    grams = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            grams = grams * np.uint64(0x9E3779B97F4A7C15) + ids[k : len(ids) - n + 1 + k].astype(np.uint64)
    return grams


def _ngram_chars(ws: list[str], lengths: np.ndarray, top_n: int = 2, dup_n: int = 5) -> tuple[int, int]:
    """Characters in all occurrences of the most frequent top_n-gram, and characters of the words
    covered by a dup_n-gram that already occurred earlier (overlapping repeats counted once), as in Gopher.
    """
    n = len(ws)
    first_seen: dict[str, int] = {}
    # Each word's id is the index of its first occurrence: setdefault keeps the first one.
    ids = np.fromiter(map(first_seen.setdefault, ws, itertools.count()), np.int64, n)
    top_chars = 0
    if n >= top_n:
        _, first, counts = np.unique(_ngram_hashes(ids, top_n), return_index=True, return_counts=True)
        ends = np.concatenate([[0], np.cumsum(lengths)])
        chars = (ends[top_n:] - ends[:-top_n])[first]  # characters of one occurrence of each n-gram
        if counts.max() > 1:  # an n-gram seen once is not repetition (as in datatrove's Gopher filter)
            most = counts == counts.max()  # of equally frequent n-grams, the longest counts
            top_chars = int(counts.max() * chars[most].max())
    if n < dup_n:
        return top_chars, 0
    grams = _ngram_hashes(ids, dup_n)
    repeat = np.ones(len(grams), dtype=bool)
    repeat[np.unique(grams, return_index=True)[1]] = False
    covered = np.zeros(n, dtype=bool)
    for k in range(dup_n):
        covered[k : k + len(repeat)] |= repeat
    return top_chars, int(lengths[covered].sum())


def quality_reason(text: str, cfg: CleaningConfig) -> str | None:
    """None if the document passes every Gopher-style rule, else the first failing rule's name."""
    ws = words(text)
    n = len(ws)
    if n < max(cfg.min_words, 1):  # a document needs a word for any ratio below to mean something
        return "too_few_words"
    if n > cfg.max_words:
        return "too_many_words"

    lengths = np.fromiter(map(len, ws), np.int64, n)
    word_chars = int(lengths.sum())
    # CJK words are single characters by construction, so their count is a count of characters.
    n_cjk = len(CJK_RE.findall(text))
    if n_cjk * 2 < n:  # word length means nothing for a mostly-CJK document
        mean = (word_chars - n_cjk) / (n - n_cjk)
        if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
            return "mean_word_length"

    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / n > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"

    lines = [line.strip() for line in text.split("\n")]
    nonblank = [line for line in lines if line]
    ellipsis = sum(line.endswith(("...", "\u2026")) for line in nonblank)
    if nonblank and ellipsis / len(nonblank) > cfg.max_ellipsis_line_fraction:
        return "ellipsis_lines"

    line_chars = sum(map(len, nonblank))
    if line_chars and _duplicate_line_chars(lines) / line_chars > cfg.max_duplicate_line_fraction:
        return "duplicate_lines"

    # n-gram shares are of word characters (no spaces), so that CJK text, which has no spaces,
    # is measured like English.
    # A CJK "word" is one character, about half a word of meaning: n-grams twice as long keep the
    # rules as strict as they are for space-separated languages (5 characters of Chinese repeat far
    # more often than 5 English words, so long books would otherwise fail).
    scale = 2 if n_cjk * 2 >= n else 1
    top_2gram_chars, repeated_5gram_chars = _ngram_chars(ws, lengths, 2 * scale, 5 * scale)
    if top_2gram_chars / word_chars > cfg.max_top_2gram_fraction:
        return "top_2gram"
    if repeated_5gram_chars / word_chars > cfg.max_duplicate_5gram_fraction:
        return "duplicate_5grams"

    # Words are letter/digit runs, so a word without any letter is a number.
    if 1 - sum(map(str.isnumeric, ws)) / n < cfg.min_alpha_word_fraction:
        return "alpha_words"
    return None


def clean_document(text: str, cfg: CleaningConfig, found: Redaction | None = None) -> tuple[str | None, str | None]:
    """(cleaned text, None) when kept, (None, reason) when dropped; reason is one of DROP_REASONS.
    With found, what redaction replaced is added to it (counts per kind, characters)."""
    if not cfg.enabled:
        return text, None
    if cfg.normalize_unicode:
        text = normalize(text)
    if cfg.strip_boilerplate:
        text = strip_boilerplate(text)
    if not text.strip():
        return None, "empty"
    if cfg.pii.enabled:
        redaction = redact(text, tuple(cfg.pii.kinds))
        if found is not None:
            found.counts.update(redaction.counts)
            found.chars += redaction.chars
            found.text = redaction.text if redaction.counts else ""
        if redaction.chars > cfg.pii.max_share * len(text):
            return None, "pii"
        text = redaction.text
    reason = quality_reason(text, cfg)
    return (None, reason) if reason else (text, None)
