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

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field

KINDS = ("email", "phone", "ip", "card", "secret")
PLACEHOLDER = {kind: f"<{kind.upper()}>" for kind in KINDS}
_FULL_WIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}  # full-width ASCII, ideographic space

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+"
                    r"[A-Za-z]{2,24}(?![\w-])", re.ASCII)
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"  # +CC then 2-5 groups
    r"|\(\d{3}\)\s?\d{3}[ .-]\d{4}"  # (555) 123-4567
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 555-123-4567
    r"|8\s?\(\d{3}\)\s?\d{3}-\d{2}-\d{2}"  # 8 (495) 123-45-67
    r"|1[3-9]\d[ -]?\d{4}[ -]?\d{4}"  # 138 0013 8000
    r")(?![\w])", re.ASCII)
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?![\w]|\.\d)", re.ASCII)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|\d{1,3}(?:\.\d{1,3}){3})(?![\w:])",
                   re.ASCII)
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])", re.ASCII)
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|3[068]|6(?:011|5|22|4[4-9])|35|62")
_SECRET = re.compile(
    r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"
    r"|-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----.*?-----END (?:[A-Z]+ )*PRIVATE KEY-----"
    r"|(?<=Bearer )[A-Za-z0-9\-._~+/]{20,}=*"
    r"|(?<![\w])gh[pousr]_[A-Za-z0-9]{36}(?![\w])"
    r"|(?<![\w])xox[abprs]-[A-Za-z0-9-]{10,}",
    re.DOTALL | re.ASCII)


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


# kind, pattern, a cheap test of the mapped text that must hold for the pattern to be tried, validator
_FINDERS = (
    ("secret", _SECRET, lambda t: "AKIA" in t or "ASIA" in t or "PRIVATE KEY" in t or "Bearer " in t
     or "gh" in t or "xox" in t, None),
    ("email", _EMAIL, lambda t: "@" in t, None),
    ("card", _CARD, None, _is_card),
    ("ip", _IPV4, lambda t: "." in t, None),
    ("ip", _IPV6, lambda t: "::" in t or t.count(":") >= 7, _is_ipv6),
    ("phone", _PHONE, None, None),
)
_HAS_DIGIT = re.compile(r"[0-9]")


@dataclass
class Redaction:
    text: str
    counts: Counter = field(default_factory=Counter)
    chars: int = 0  # characters of the original text that were replaced


def find(text: str, kinds: tuple[str, ...] = KINDS) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every match, earlier kinds in _FINDERS first where two overlap."""
    mapped = text.translate(_FULL_WIDTH)
    digits = _HAS_DIGIT.search(mapped) is not None
    taken: list[tuple[int, int, str]] = []
    for kind, pattern, worth_trying, valid in _FINDERS:
        if kind not in kinds or (kind in ("card", "ip", "phone") and not digits):
            continue
        if worth_trying is not None and not worth_trying(mapped):
            continue
        for m in pattern.finditer(mapped):
            if valid is not None and not valid(m.group()):
                continue
            if any(m.start() < end and start < m.end() for start, end, _ in taken):
                continue
            taken.append((m.start(), m.end(), kind))
    return sorted(taken)


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
