"""A generated set for redaction: prose with planted personal data and look-alikes, every planted item's
kind and place known, so precision and recall of llm_ray.data.pii can be counted
(benchmarks/prepare_throughput.py --pii). Most items use the written forms the redactor knows (the set
measures that it finds them and nothing else); a few use forms it leaves by design (ten bare digits,
"name at example dot com"), so recall below 1 shows those limits."""

from __future__ import annotations

import random
import string


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    from llm_ray.data.pii import luhn

    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return next(body + d for d in string.digits if luhn(body + d))


def _grouped(digits: str, sep: str) -> str:
    return sep.join(digits[i:i + 4] for i in range(0, len(digits), 4))


def planted_item(rng: random.Random) -> tuple[str, str]:
    """(kind, text) of one random item of personal data, in one of several written forms."""
    kind = rng.choice(["email", "phone", "ip", "card", "secret"])
    d = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    if kind == "email":
        user = rng.choice(["j.smith", "anna_k", "wei.li", "ivan.petrov", "m+news", "contact"]) + d(rng.randint(0, 3))
        domain = rng.choice(["example.com", "mail.example.org", "uni.example.edu.cn", "example.ru"])
        # one in ten written to dodge scrapers ("at", "dot"): not found by design, it lowers recall honestly
        text = f"{user} at {domain.replace('.', ' dot ')}" if rng.random() < 0.1 else f"{user}@{domain}"
    elif kind == "phone":
        text = rng.choice([f"+1 ({d(3)}) {d(3)}-{d(4)}", f"({d(3)}) {d(3)}-{d(4)}", f"{d(3)}-{d(3)}-{d(4)}",
                           f"+44 20 {d(4)} {d(4)}", f"+7 {d(3)} {d(3)}-{d(2)}-{d(2)}", f"8 ({d(3)}) {d(3)}-{d(2)}-{d(2)}",
                           f"1{rng.choice('3456789')}{d(1)} {d(4)} {d(4)}", f"+86 10 {d(4)} {d(4)}",
                           f"{rng.randint(2, 9)}{d(9)}"])  # ten bare digits: not found (a digit run is not a phone)
    elif kind == "ip":
        text = rng.choice([".".join(str(rng.randint(1, 254)) for _ in range(4)),
                           f"2001:db8::{rng.randint(1, 0xffff):x}:{rng.randint(1, 0xffff):x}",
                           f"fe80::{rng.randint(1, 0xffff):x}"])
    elif kind == "card":
        digits = rng.choice([_luhn_complete("4", 16, rng), _luhn_complete("51", 16, rng), _luhn_complete("37", 15, rng)])
        text = rng.choice([digits, _grouped(digits, " "), _grouped(digits, "-")])
    else:
        text = rng.choice(["AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
                           "Bearer " + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(32))])
    return kind, text


def look_alike(rng: random.Random) -> str:
    """Text that looks like personal data and is not: versions, dates, ISBNs, prices, ids failing Luhn."""
    d = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    from llm_ray.data.pii import luhn

    not_card = next(x for x in (d(16) for _ in range(100)) if not luhn(x))
    return rng.choice([f"version {rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}",
                       f"{rng.randint(1900, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                       f"ISBN 978-{d(1)}-{d(2)}-{d(6)}-{d(1)}", f"${rng.randint(1, 99)},{d(3)}.{d(2)}",
                       f"order {_grouped(not_card, ' ')}", f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{d(2)}",
                       f"page {rng.randint(1, 999)}, line {rng.randint(1, 99)}", f"{d(2)}.{d(4)} N"])


def generated_set(paragraphs: list[str], documents: int, seed: int = 0):
    """documents texts with planted items and look-alikes between sentences; returns
    [(text, [(start, end, kind), ...])] with every planted item's span."""
    rng = random.Random(seed)
    out = []
    for _ in range(documents):
        pieces, spans, size = [], [], 0
        for paragraph in rng.sample(paragraphs, 6):
            for sentence in paragraph.split(". "):
                pieces.append(sentence + ". ")
                size += len(pieces[-1])
                roll = rng.random()
                if roll < 0.04:
                    kind, item = planted_item(rng)
                    text = f"Contact {item} now. "
                    spans.append((size + 8, size + 8 + len(item), kind))
                elif roll < 0.08:
                    text = f"See {look_alike(rng)} there. "
                else:
                    continue
                pieces.append(text)
                size += len(text)
        out.append(("".join(pieces), spans))
    return out


def precision_recall(docs) -> tuple[dict, dict, dict]:
    """Per kind and overall: precision (redactions that cover a planted item of that kind) and recall
    (planted items covered by a redaction of their kind), and the planted counts."""
    from llm_ray.data.pii import KINDS, find

    kinds = (*KINDS, "all")
    correct, found_n, covered, planted_n = ({k: 0 for k in kinds} for _ in range(4))
    for text, planted in docs:
        found = find(text)
        for start, end, kind in found:
            hit = any(s < end and start < e and k == kind for s, e, k in planted)
            for key in (kind, "all"):
                found_n[key] += 1
                correct[key] += hit
        for s, e, k in planted:
            hit = any(start < e and s < end and kind == k for start, end, kind in found)
            for key in (k, "all"):
                planted_n[key] += 1
                covered[key] += hit
    precision = {k: correct[k] / found_n[k] if found_n[k] else 1.0 for k in kinds}
    recall = {k: covered[k] / planted_n[k] if planted_n[k] else 1.0 for k in kinds}
    return precision, recall, planted_n
