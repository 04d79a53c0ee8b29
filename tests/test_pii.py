"""Redaction of personal data and secrets (llm_ray.data.pii): planted items in three scripts found,
look-alikes kept, full-width forms matched, everything else left byte for byte."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_ray.data.pii import KINDS, PLACEHOLDER, example, luhn, redact

PLANTED = [  # (text with one item, the item, its kind)
    ("Write to jane.doe+news@mail.example.org for details.", "jane.doe+news@mail.example.org", "email"),
    ("Call us on +1 (555) 123-4567 during the week.", "+1 (555) 123-4567", "phone"),
    ("Office: (212) 555-0199, ask for Ann.", "(212) 555-0199", "phone"),
    ("London office +44 20 7946 0958 is closed.", "+44 20 7946 0958", "phone"),
    ("The gateway 10.0.0.1 answers pings.", "10.0.0.1", "ip"),
    ("Bind to 2001:db8::8a2e:370:7334 instead.", "2001:db8::8a2e:370:7334", "ip"),
    ("Paid with 4539 1488 0343 6467 yesterday.", "4539 1488 0343 6467", "card"),
    ("Amex 3714-496353-98431 on file.", "3714-496353-98431", "card"),
    ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE", "secret"),
    ("Authorization: Bearer abcDEF1234567890ghijKLmn.op-qr_st", "abcDEF1234567890ghijKLmn.op-qr_st", "secret"),
    ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789 leaked", "ghp_abcdefghijklmnopqrstuvwxyz0123456789", "secret"),
    ("slack xoxb-123456789012-abcdefABCDEF in chat", "xoxb-123456789012-abcdefABCDEF", "secret"),
    # Chinese
    ("如有问题请发邮件至zhang.san@example.cn，谢谢。", "zhang.san@example.cn", "email"),
    ("我的手机号是13800138000，请回电。", "13800138000", "phone"),
    ("客服电话：+86 10 6552 9988（工作日）。", "+86 10 6552 9988", "phone"),
    ("服务器地址为192.168.10.5，请勿公开。", "192.168.10.5", "ip"),
    # Russian
    ("Пишите на адрес ivan.petrov@example.ru в любое время.", "ivan.petrov@example.ru", "email"),
    ("Звоните: 8 (495) 123-45-67, спросите Олега.", "8 (495) 123-45-67", "phone"),
    ("Мобильный +7 912 345-67-89 доступен вечером.", "+7 912 345-67-89", "phone"),
    ("Оплата картой 5500 0000 0000 0004 прошла.", "5500 0000 0000 0004", "card"),
    # full-width forms
    ("連絡先：ｔａｒｏ＠ｅｘａｍｐｌｅ．ｊｐ まで。", "ｔａｒｏ＠ｅｘａｍｐｌｅ．ｊｐ", "email"),
    ("電話 ＋８１ ３ １２３４ ５６７８ です。", "＋８１ ３ １２３４ ５６７８", "phone"),
    ("カード ４１１１ １１１１ １１１１ １１１１ で支払い。", "４１１１ １１１１ １１１１ １１１１", "card"),
]

LOOK_ALIKES = [
    "Released as version 2.14.3 on 2024-03-15, replacing 1.9.0.",
    "Windows build 10.0.19041.1 and kernel 5.15.0-91-generic.",
    "ISBN 978-3-16-148410-0 and ISBN 0-306-40615-2 are cited.",
    "It costs $1,234.56 or €99.99, about ¥12,000 in total.",
    "The meeting is on 12/31/2023 at 12:30:45 in room 4B.",
    "Order id 1234 5678 9012 3456 is not a card (Luhn fails).",
    "Invoice 20240115000123 was paid; ref 4111-1111-1111-1112.",
    "Pi is 3.14159265358979 and e is 2.718281828.",
    "The 2022-2023 season had 38 games and 114 goals.",
    "按照GB/T 7714-2015标准，第3.2.1节规定了格式。",
    "В 2023 году тираж составил 1 250 000 экземпляров, цена 350,00 руб.",
    "Call at 5 p.m.; room 1203, floor 12, building 7.",
    "Coordinates 48.8566, 2.3522 and scale 1:50000.",
    "The words cowghp_abcdefghijklmnopqrstuvwxyz0123456789 and PAKIAIOSFODNN7EXAMPLE are glued to others.",
]


@pytest.mark.parametrize("text, item, kind", PLANTED)
def test_planted_items_are_replaced_by_their_kind(text, item, kind):
    r = redact(text)
    assert r.text == text.replace(item, PLACEHOLDER[kind])
    assert dict(r.counts) == {kind: 1} and r.chars == len(item)


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_survive(text):
    r = redact(text)
    assert r.text == text and not r.counts


def test_a_private_key_block_goes_whole_and_the_text_around_it_stays():
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA0Z3VS5JJcds3xfn\n-----END RSA PRIVATE KEY-----"
    r = redact(f"config:\n{key}\nend")
    assert r.text == "config:\n<SECRET>\nend"


def test_kinds_can_be_chosen():
    text = "mail a@example.com or call +1 (555) 123-4567"
    assert redact(text, ("email",)).text == "mail <EMAIL> or call +1 (555) 123-4567"
    assert redact(text, ()).text == text


def test_luhn():
    assert luhn("4539148803436467") and luhn("79927398713")
    assert not luhn("4539148803436468") and not luhn("1234567890123456")


def test_examples_show_the_redacted_text_around_the_first_placeholder():
    r = redact("x" * 100 + " mail bob@example.com now " + "y" * 100)
    shown = example(r.text)
    assert "<EMAIL>" in shown and "bob@" not in shown and shown.startswith("...") and len(shown) < 70


CJK = st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF) | st.sampled_from("，。、 ：；！？"),
              max_size=200)


@settings(max_examples=200, deadline=None)
@given(CJK)
def test_cjk_text_is_never_changed(text):
    assert redact(text).text == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_redaction_is_stable_and_counts_what_it_replaced(text):
    first = redact(text)
    assert redact(first.text).text == first.text  # nothing left to find, placeholders are not matched
    assert sum(first.counts.values()) == sum(first.text.count(PLACEHOLDER[k]) for k in KINDS) - sum(
        text.count(PLACEHOLDER[k]) for k in KINDS)


def test_clean_document_redacts_before_the_quality_rules_and_drops_what_is_mostly_personal_data():
    from llm_ray.config import CleaningConfig
    from llm_ray.data.clean import clean_document
    from llm_ray.data.pii import Redaction

    prose = ("The harbour was quiet that morning, and the boats rocked gently against the old stone wall while "
             "the fishermen mended their nets and talked about the weather and the price of bread. Later a cart "
             "came down the hill carrying barrels of apples, which the children counted twice before running off "
             "toward the lighthouse where their grandmother kept goats, chickens and a very patient grey donkey. "
             "Nobody expected the storm that evening, yet every window was shuttered long before sunset. ")
    text = prose + "Write to mary.jones@example.com with questions."
    found = Redaction("")
    cleaned, reason = clean_document(text, CleaningConfig(), found)
    assert reason is None and cleaned.endswith("Write to <EMAIL> with questions.")
    assert dict(found.counts) == {"email": 1} and found.chars == len("mary.jones@example.com")
    off = CleaningConfig(pii={"enabled": False})
    assert clean_document(text, off)[0] == text
    assert clean_document(text, CleaningConfig(pii={"kinds": ["phone"]}))[0] == text
    listing = prose[:200] + " " + " ".join(f"user{i}@example.com" for i in range(30))
    assert clean_document(listing, CleaningConfig()) == (None, "pii")
    assert clean_document(listing, CleaningConfig(pii={"max_share": 1.0}))[1] != "pii"  # (other rules may drop it)
