"""Language of a cleaned document: langid on a bounded sample, with a script rule for CJK text.

`detect` returns one of langid's ISO 639-1 codes (`SUPPORTED`), or "und" when the sample holds no
letter. langid's model ships inside its wheel (nothing is downloaded) and is loaded once per process,
on first use (~1 s), so importing this module costs nothing; the codes come from llm_ray.config.languages.

Mixed CJK and other text is decided by which script carries most of the text, CJK characters
weighted by how much text each stands for (see `cjk_language`): a Chinese document with English
terms is zh, an English document quoting a few Chinese words is en. Among CJK text, Hangul means
Korean, a sizeable share of kana Japanese, and Han characters alone Chinese: a kanji-only Japanese
headline is zh (langid says the same: without kana nothing tells them apart).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection

from llm_ray.config.languages import LANGID_CODES
from llm_ray.data.text_units import HAN, HANGUL, KANA

SUPPORTED: frozenset[str] = frozenset(LANGID_CODES)  # tests check it against langid's model
UNDETERMINED = "und"  # ISO 639-2 "undetermined": digits, punctuation or nothing

# langid reads every UTF-8 byte in a Python loop (~0.1 ms per KB) on top of a fixed ~0.7 ms per call,
# so a 1 MB document would cost ~100 ms whole. Measured on prose in 11 languages, windows of 100
# characters are already always right; 1,500 characters cost ~1.1 ms, barely over the fixed cost, and
# leave room for three windows of 500, so one window landing on a table or code block is outvoted.
SAMPLE_CHARS = 1_500
NUM_WINDOWS = 3

_HAN_RE = re.compile(f"[{HAN}]")
_KANA_RE = re.compile(f"[{KANA}]")
_HANGUL_RE = re.compile(f"[\u1100-\u11ff\u3131-\u318e{HANGUL}]")  # with the jamo, which are no words
# CJK letters, punctuation and fullwidth forms: removed before langid sees a mostly non-CJK sample,
# because each is three UTF-8 bytes that only zh, ja or ko ever produce, so a few quoted Chinese
# words can outweigh two English sentences ("The sign said 禁止吸烟 ..." is zh to langid).
_CJK_TEXT_RE = re.compile(
    "[\u1100-\u11ff\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003ffff]+"
)

# Letters of an alphabetic script one CJK character stands for: the UN Declaration's first article
# has 139 letters in English (133-151 in de, fr, ru), 39 characters in Chinese (3.6x), 77 in
# Japanese (1.8x) and 66 in Korean (2.1x). Rounded down, so CJK wins only when it carries more.
HAN_WEIGHT = 3
KANA_HANGUL_WEIGHT = 2
# Share of kana among Han and kana characters: Japanese prose is mostly kana (the same article: 68%,
# a statute 47%, a dense news sentence 21%); Chinese has none bar a quoted Japanese name or title
# (12% in two short sentences quoting 《ドラえもん》, less in a whole document).
JA_MIN_KANA_SHARE = 0.15


def detect(text: str) -> str:
    """ISO 639-1 code of `text`'s language (one of SUPPORTED), or "und" when its sample has no letter."""
    sample = sample_text(text)
    num_letters = sum(map(str.isalpha, sample))
    if num_letters == 0:
        return UNDETERMINED
    cjk = cjk_language(sample, num_letters)
    if cjk is not None:
        return cjk
    lang, _ = _identifier().classify(_CJK_TEXT_RE.sub(" ", sample))
    return str(lang)


def sample_text(text: str, max_chars: int = SAMPLE_CHARS, num_windows: int = NUM_WINDOWS) -> str:
    """`text` itself when short; else `num_windows` windows totalling `max_chars`, spread inside it."""
    if len(text) <= max_chars:
        return text
    width = max_chars // num_windows
    span = len(text) - width
    # Windows centred on the quarter points (for 3): the start of a long document is often a
    # header, licence or table of contents, and its end a footer, neither in the body's language.
    # A window may cut a word at each end: two partial words in ~80 do not move langid.
    starts = [span * (i + 1) // (num_windows + 1) for i in range(num_windows)]
    return "\n".join(text[start:start + width] for start in starts)


def cjk_language(sample: str, num_letters: int) -> str | None:
    """zh, ja or ko when CJK characters carry most of the sample's text (weighted), else None."""
    num_han = len(_HAN_RE.findall(sample))
    num_kana = len(_KANA_RE.findall(sample))
    num_hangul = len(_HANGUL_RE.findall(sample))
    num_other = max(0, num_letters - num_han - num_kana - num_hangul)  # Latin, Cyrillic, Arabic ...
    if HAN_WEIGHT * num_han + KANA_HANGUL_WEIGHT * (num_kana + num_hangul) <= num_other:
        return None
    if num_hangul >= num_han + num_kana:  # Hanja in Korean gloss Hangul words: 한국어(韓國語) is ko
        return "ko"
    if num_kana >= JA_MIN_KANA_SHARE * (num_han + num_kana):
        return "ja"
    return "zh"


def keep(lang: str, allowed: Collection[str]) -> bool:
    """Whether a document in `lang` passes the filter `allowed` (cleaning.languages; empty keeps all)."""
    return not allowed or lang in allowed


@functools.cache
def _identifier():
    """langid's model, loaded once per process (~1 s): our own instance, not langid's global one,
    so nothing else calling langid.set_languages can narrow what we detect."""
    from langid.langid import LanguageIdentifier, model  # heavy: decompresses the model

    # norm_probs=False: only the most likely class is used, its probability is not.
    return LanguageIdentifier.from_modelstring(model, norm_probs=False)
