"""The language codes `cleaning.languages` accepts: those langid's model knows, as plain data.

The tuple is written out rather than read from langid so that validating a config (which
every command does) never loads langid's model; tests/test_language.py checks it against the
model. It lives under config/ because config/ sits below data/: llm_ray.data.language imports
it from here, never the other way round.
"""

from __future__ import annotations

# langid 1.1.6, LanguageIdentifier.nb_classes, in the model's order (ISO 639-1).
LANGID_CODES: tuple[str, ...] = (
    "af", "am", "an", "ar", "as", "az", "be", "bg", "bn", "br", "bs", "ca", "cs", "cy", "da", "de", "dz",
    "el", "en", "eo", "es", "et", "eu", "fa", "fi", "fo", "fr", "ga", "gl", "gu", "he", "hi", "hr", "ht",
    "hu", "hy", "id", "is", "it", "ja", "jv", "ka", "kk", "km", "kn", "ko", "ku", "ky", "la", "lb", "lo",
    "lt", "lv", "mg", "mk", "ml", "mn", "mr", "ms", "mt", "nb", "ne", "nl", "nn", "no", "oc", "or", "pa",
    "pl", "ps", "pt", "qu", "ro", "ru", "rw", "se", "si", "sk", "sl", "sq", "sr", "sv", "sw", "ta", "te",
    "th", "tl", "tr", "ug", "uk", "ur", "vi", "vo", "wa", "xh", "zh", "zu",
)

# Country codes people write for a language; each of these keys is not itself a langid code.
_COUNTRY_TO_LANGUAGE = {"jp": "ja", "cn": "zh", "tw": "zh", "kr": "ko", "gr": "el", "cz": "cs", "dk": "da",
                        "ua": "uk", "iw": "he", "il": "he", "ee": "et", "vn": "vi", "rs": "sr"}


def unknown_language_message(code: str) -> str:
    """Why `code` is refused by cleaning.languages, with a likely replacement when there is one."""
    base = code.replace("_", "-").split("-")[0]  # zh-CN, en_US: locale tags carry the language first
    guess = base if base in LANGID_CODES else _COUNTRY_TO_LANGUAGE.get(base)
    hint = f"did you mean {guess!r}? " if guess else ""
    return (f"unknown language code {code!r}; {hint}cleaning.languages takes the ISO 639-1 codes langid "
            f"knows, e.g. en, zh, ja, ko, de, fr, es, ru (all {len(LANGID_CODES)} in llm_ray/config/languages.py)")
