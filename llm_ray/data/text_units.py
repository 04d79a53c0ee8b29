"""What a word is, once for cleaning, deduplication and contamination: letter and digit runs (marks
and inner apostrophes included), and each CJK ideograph, kana or Hangul syllable a word of its own.
Also the Unicode classes cleaning and language identification share. Plain Python."""

from __future__ import annotations

import re
import unicodedata

# Scripts written without spaces between words: each character is one word, so a Chinese
# paragraph is ~100 words rather than one 100-character "word". Han (with 々〆〇 and the
# compatibility and supplementary-plane ideographs), Hiragana, Katakana (with the half-width
# forms), Hangul syllables. Regex character-class bodies.
HAN = "\u3005-\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
KANA = "\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
HANGUL = "\uac00-\ud7a3"
CJK = HAN + KANA + HANGUL
CJK_RE = re.compile(f"[{CJK}]")


def _char_classes(*selectors) -> list[str]:
    """Regex character-class bodies, one per selector(char, category), from one scan of Unicode."""
    ranges: list[list[list[int]]] = [[] for _ in selectors]
    # Planes 4-13, 15 and 16 hold no letters, marks or controls (unassigned or private use).
    for cp in (*range(0x40000), *range(0xE0000, 0xF0000)):
        char = chr(cp)
        category = unicodedata.category(char)
        for selector, found in zip(selectors, ranges):
            if selector(char, category):
                if found and found[-1][1] == cp - 1:
                    found[-1][1] = cp
                else:
                    found.append([cp, cp])
    return [
        "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in found)
        for found in ranges
    ]


# Python's \w misses combining marks (Mn/Mc), which would cut Hindi, Bengali or decomposed Latin
# words apart, so marks join words too. Only the BMP's: a class with characters beyond it is
# searched range by range, several times slower, and the astral marks are for historic scripts.
# No underscore: "_italic_" markup is not part of a word. Invisible: control (Cc) and format (Cf)
# characters only split or glue tokens at random; ZWNJ/ZWJ stay, as they change spelling in
# Persian and Indic scripts and build emoji sequences. Lone surrogates (Cs) cannot become UTF-8.
MARKS, INVISIBLE = _char_classes(
    lambda char, cat: cat[0] == "M" and char <= "\uffff",
    lambda char, cat: cat in ("Cc", "Cf", "Cs") and char not in "\t\n\u200c\u200d",
)
# A letter/digit run with marks after its letters; spelled without an alternation per
# character, which would double the time words() takes. The classes are disjoint: no backtracking.
_WORD_CORE = f"[^\\W_{CJK}]+(?:[{MARKS}]+[^\\W_{CJK}]*)*"
_WORD_RE = re.compile(
    f"[{CJK}]"  # each ideograph, kana or syllable is a word of its own
    f"|{_WORD_CORE}(?:['\u2019]{_WORD_CORE})*"  # apostrophes inside a word: don't, l'homme
)

# The same words in ASCII text, twice as fast: no marks, CJK or curly apostrophes to consider.
_ASCII_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z0-9]+)*")


def words(text: str) -> list[str]:
    """Words: letter/digit runs (apostrophes inside allowed); each CJK ideograph, kana or Hangul syllable alone."""
    return (_ASCII_WORD_RE if text.isascii() else _WORD_RE).findall(text)
