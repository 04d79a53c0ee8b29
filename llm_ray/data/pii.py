"""Personal data and secrets found in a document and replaced by a placeholder of their kind.

Kinds (each a placeholder in plain text, e.g. ``<EMAIL>``; the tokenizer learns them as it learns
any frequent string):

    email    local@domain.tld
    phone    international numbers (+ and a country code), and the grouped national formats of
             North America ((555) 123-4567, 555-123-4567), Russia (8 (495) 123-45-67) and China's
             mobiles (138 0013 8000): never a bare digit run, a date or an ISBN
    ip       IPv4 (every part 0-255, not inside a longer dotted run) and IPv6 (validated by
             ``ipaddress``)
    card     13-19 digits, spaces or hyphens between groups, that pass the Luhn check and start
             as a card network's numbers do (Visa, Mastercard, Amex, Discover, JCB, UnionPay,
             Diners)
    secret   AWS access key ids, PEM private-key blocks, bearer tokens (the token, not the word),
             GitHub and Slack tokens

Unicode: matching is ASCII (re.ASCII), so an address glued to CJK text (邮件至li@example.cn) is still
found, and full-width forms (U+FF01-FF5E, e.g. ``１２３`` and ``＠``) are matched as their ASCII
counterparts and replaced in the original text; other scripts are left as they are. Finding
runs on a copy mapped one character to one, so positions agree and CJK text is never rewritten
outside a match.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field

KINDS = ("email", "phone", "ip", "card", "secret")
PLACEHOLDER = {kind: f"<{kind.upper()}>" for kind in KINDS}
_FULL_WIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}  # full-width ASCII, ideographic space

_EMAIL = re.compile(r"[A-Za-z0-9](?<![\w.%+-][A-Za-z0-9])[A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+"
                    r"[A-Za-z]{2,24}(?![\w-])", re.ASCII)
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"  # +CC then 2-5 groups
    r"|\(\d{3}\)\s?\d{3}[ .-]\d{4}"  # (555) 123-4567
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 555-123-4567
    r"|8\s?\(\d{3}\)\s?\d{3}-\d{2}-\d{2}"  # 8 (495) 123-45-67
    r"|1[3-9]\d[ -]?\d{4}[ -]?\d{4}"  # 138 0013 8000
    r")(?![\w])", re.ASCII)
_IPV4 = re.compile(r"(?=\d)(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?![\w]|\.\d)", re.ASCII)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|\d{1,3}(?:\.\d{1,3}){3})(?![\w:])",
                   re.ASCII)
_CARD = re.compile(r"\d(?<![\w-]\d)(?:[ -]?\d){12,18}(?![\w-])", re.ASCII)
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|3[068]|6(?:011|5|22|4[4-9])|35|62")
_SECRETS = (  # (substrings one of which a text must hold, pattern)
    (("AKIA", "ASIA"), re.compile(r"(?:AKIA|ASIA)(?<![A-Z0-9]....)[A-Z0-9]{16}(?![A-Z0-9])", re.ASCII)),
    (("PRIVATE KEY",), re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----.*?-----END (?:[A-Z]+ )*PRIVATE KEY-----",
                                  re.DOTALL | re.ASCII)),
    (("Bearer ",), re.compile(r"(?<=Bearer )[A-Za-z0-9\-._~+/]{20,}=*", re.ASCII)),
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), re.compile(r"gh[pousr]_(?<![\w]....)[A-Za-z0-9]{36}(?![\w])", re.ASCII)),
    (("xox",), re.compile(r"xox[abprs]-(?<![\w].....)[A-Za-z0-9-]{10,}", re.ASCII)),
)


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(match: str) -> bool:
    digits = match.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn(digits)


def _is_ipv6(match: str) -> bool:
    if match.count(":") < 2 or "::" not in match and match.count(":") < 7:
        return False
    try:
        ipaddress.IPv6Address(match)
    except ValueError:
        return False
    return True


_DIGIT_RUN = re.compile(r"[0-9][0-9 ().-]{5,}[0-9]")  # 7+ characters of digits and separators: phone or card
_DOTTED = re.compile(r"[0-9]\.[0-9]{1,3}\.[0-9]")
_HEX_COLON = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f:]")


def _candidates(text: str, kinds) -> list[tuple[str, re.Pattern, object]]:
    """(kind, pattern, validator) worth running on text: cheap substring and short-regex tests first,
    so prose without any candidate costs a few scans (benchmarks/prepare_throughput.py measures it)."""
    found = [("secret", pattern, None) for hints, pattern in _SECRETS if "secret" in kinds
             and any(h in text for h in hints)]
    if "email" in kinds and "@" in text:
        found.append(("email", _EMAIL, None))
    if not any(d in text for d in "0123456789"):
        return found
    digit_run = ("card" in kinds or "phone" in kinds) and _DIGIT_RUN.search(text) is not None
    if digit_run and "card" in kinds:
        found.append(("card", _CARD, _is_card))
    if "ip" in kinds:
        if _DOTTED.search(text):
            found.append(("ip", _IPV4, None))
        if "::" in text or _HEX_COLON.search(text):
            found.append(("ip", _IPV6, _is_ipv6))
    if digit_run and "phone" in kinds:
        found.append(("phone", _PHONE, None))
    return found  # in the order of precedence: where two matches overlap, the earlier kind wins


_FULL_WIDTH_CHARS = re.compile("[\uff01-\uff5e\u3000]")


@dataclass
class Redaction:
    text: str
    counts: Counter = field(default_factory=Counter)
    chars: int = 0  # characters of the original text that were replaced


def find(text: str, kinds: tuple[str, ...] = KINDS) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every match; where two overlap, the kind tried first (secret, email, card,
    ip, phone) wins."""
    full_width = not text.isascii() and _FULL_WIDTH_CHARS.search(text) is not None
    mapped = text.translate(_FULL_WIDTH) if full_width else text
    taken: list[tuple[int, int, str]] = []  # sorted, never overlapping: a new match meets at most its neighbours
    for kind, pattern, valid in _candidates(mapped, kinds):
        for m in pattern.finditer(mapped):
            if valid is not None and not valid(m.group()):
                continue
            i = bisect.bisect_left(taken, (m.start(),))
            if (i > 0 and taken[i - 1][1] > m.start()) or (i < len(taken) and taken[i][0] < m.end()):
                continue
            taken.insert(i, (m.start(), m.end(), kind))
    return taken


def redact(text: str, kinds: tuple[str, ...] = KINDS) -> Redaction:
    """The text with every match replaced by its kind's placeholder, and what was replaced."""
    spans = find(text, kinds)
    if not spans:
        return Redaction(text)
    out, last, counts, chars = [], 0, Counter(), 0
    for start, end, kind in spans:
        out += [text[last:start], PLACEHOLDER[kind]]
        counts[kind] += 1
        chars += end - start
        last = end
    out.append(text[last:])
    return Redaction("".join(out), counts, chars)


def example(redacted: str, width: int = 60) -> str:
    """A short excerpt of a redacted text around its first placeholder (for reports)."""
    first = min((i for i in (redacted.find(p) for p in PLACEHOLDER.values()) if i >= 0), default=0)
    start = max(0, first - width // 2)
    excerpt = redacted[start:start + width].replace("\n", " ")
    return ("..." if start else "") + excerpt + ("..." if start + width < len(redacted) else "")
