import itertools
import random
import unicodedata

import pytest

from llm_ray.config import CleaningConfig
from llm_ray.data.clean import DROP_REASONS, clean_document, normalize, quality_reason, strip_boilerplate
from llm_ray.data.text_units import words

CFG = CleaningConfig()

# Public-domain openings: Austen, Tao Yuanming (桃花源记), Lu Xun (故乡), Natsume Sōseki (吾輩は猫である),
# Tolstoy (Анна Каренина). Each is ordinary prose that every rule must keep.
ENGLISH = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. “My dear Mr. Bennet,” said his lady to him "
    "one day, “have you heard that Netherfield Park is let at last?” Mr. Bennet replied that he had not."
)
CLASSICAL_CHINESE = (
    "晋太元中，武陵人捕鱼为业。缘溪行，忘路之远近。忽逢桃花林，夹岸数百步，中无杂树，芳草鲜美，落英缤纷。"
    "渔人甚异之，复前行，欲穷其林。林尽水源，便得一山，山有小口，仿佛若有光。便舍船，从口入。初极狭，才通人。"
    "复行数十步，豁然开朗。土地平旷，屋舍俨然，有良田美池桑竹之属。阡陌交通，鸡犬相闻。其中往来种作，"
    "男女衣着，悉如外人。黄发垂髫，并怡然自乐。"
)
MODERN_CHINESE = (
    "我冒了严寒，回到相隔二千余里，别了二十余年的故乡去。时候既然是深冬；渐近故乡时，天气又阴晦了，"
    "冷风吹进船舱中，呜呜的响，从篷隙向外一望，苍黄的天底下，远近横着几个萧索的荒村，没有一些活气。"
    "我的心禁不住悲凉起来了。阿！这不是我二十年来时时记得的故乡？"
)
JAPANESE = (
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で"
    "ニャーニャー泣いていた事だけは記憶している。吾輩はここで始めて人間というものを見た。しかもあとで聞くと"
    "それは書生という人間中で一番獰悪な種族であったそうだ。この書生というのは時々我々を捕えて煮て食うという"
    "話である。しかしその当時は何という考もなかったから別段恐しいとも思わなかった。ただ彼の掌に載せられて"
    "スーと持ち上げられた時何だかフワフワした感じがあったばかりである。"
)
RUSSIAN = (
    "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива по-своему. "
    "Всё смешалось в доме Облонских. Жена узнала, что муж был в связи с бывшею в их доме "
    "француженкою-гувернанткой, и объявила мужу, что не может жить с ним в одном доме. Положение это "
    "продолжалось уже третий день и мучительно чувствовалось и самими супругами, и всеми членами семьи, и "
    "домочадцами. Все члены семьи и домочадцы чувствовали, что нет смысла в их сожительстве и что на каждом "
    "постоялом дворе случайно сошедшиеся люди более связаны между собой, чем они, члены семьи и домочадцы "
    "Облонских. Жена не выходила из своих комнат, мужа третий день не было дома. Дети бегали по всему дому, как "
    "потерянные; англичанка поссорилась с экономкой и написала записку приятельнице, прося приискать ей новое "
    "место; повар ушел еще вчера со двора, во время обеда; черная кухарка и кучер просили расчета."
)
# A play: speaker names repeat on lines of their own, which must not count as duplicated content.
HAMLET = """Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

Fran.
Bernardo?

Ber.
He.

Fran.
You come most carefully upon your hour.

Ber.
'Tis now struck twelve. Get thee to bed, Francisco.

Fran.
For this relief much thanks: 'tis bitter cold,
And I am sick at heart.

Ber.
Have you had quiet guard?

Fran.
Not a mouse stirring.

Ber.
Well, good night.
If you do meet Horatio and Marcellus,
The rivals of my watch, bid them make haste.

Fran.
I think I hear them.--Stand, ho! Who is there?

[Enter Horatio and Marcellus.]

Hor.
Friends to this ground.

Mar.
And liegemen to the Dane.

Fran.
Give you good-night.

Mar.
O, farewell, honest soldier;
Who hath reliev'd you?

Fran.
Bernardo has my place.
Give you good-night.

[Exit.]

Mar.
Holla! Bernardo!

Ber.
Say.
What, is Horatio there?

Hor.
A piece of him."""


def as_lines(text: str, per_line: int = 10) -> list[str]:
    ws = words(text)
    return [" ".join(ws[i : i + per_line]) for i in range(0, len(ws), per_line)]


def distinct_words(count: int, length: int) -> str:
    """count different made-up words of one length: no word or n-gram repeats."""
    return " ".join("".join(p) for p in itertools.islice(itertools.product("etaoinshrdlu", repeat=length), count))


# --- normalize ---------------------------------------------------------------------------------


def test_normalize_composes_to_nfc():
    decomposed, composed = "caf\u0065\u0301", "caf\u00e9"
    assert normalize(decomposed) == normalize(composed) == composed
    assert unicodedata.is_normalized("NFC", normalize("Ame\u0301lie"))


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("zero\u200bwidth", "zerowidth"),
        ("\ufeffBOM at the start", "BOM at the start"),
        ("soft\u00adhyphen", "softhyphen"),
        ("bell\x07 and null\x00", "bell and null"),
        ("one\r\ntwo\rthree", "one\ntwo\nthree"),
        ("non\u00a0breaking\u3000ideographic\u2009thin", "non breaking ideographic thin"),
        ("many    spaces", "many spaces"),
        ("a\t \tb", "a\tb"),  # a run with a tab stays one tab: table columns survive
        ("trailing   \nspaces \t\nend", "trailing\nspaces\nend"),
        ("a\n\n\n\n\n\nb", "a\n\n\nb"),  # 3+ blank lines become 2
        ("a\n\n\nb", "a\n\n\nb"),
        ("  \n\n padded document \n\n ", "padded document"),
        ("line\u2028separator", "line\nseparator"),
    ],
)
def test_normalize_cases(raw, clean):
    assert normalize(raw) == clean


def test_normalize_keeps_joiners_that_carry_meaning():
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # one emoji, glued by ZWJ
    persian = "می\u200cخواهم"  # ZWNJ is part of Persian spelling
    assert normalize(family) == family and normalize(persian) == persian


def test_ascii_fast_paths_equal_the_general_rules():
    from llm_ray.data.clean import _characters, _characters_ascii
    from llm_ray.data.text_units import _WORD_RE

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)] + ["ab", "don't", "  ", "\r\n", "\t \n", "\n\n\n\n\n"] * 8
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert _characters_ascii(text) == _characters(text), repr(text)
        assert words(text) == _WORD_RE.findall(text), repr(text)


def test_normalize_is_idempotent():
    messy = "\ufeffTitle\r\n\r\n\r\n\r\n\u00a0Body  text\u200b here.  \n"
    assert normalize(normalize(messy)) == normalize(messy)


# --- strip_boilerplate -------------------------------------------------------------------------

BODY = "HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n\nACT I.\n\nBer.\nWho's there?"

MODERN = f"""The Project Gutenberg eBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere in the United States and
most other parts of the world at no cost and with almost no restrictions
whatsoever. You may copy it, give it away or re-use it under the terms
of the Project Gutenberg License included with this eBook or online at
www.gutenberg.org.

Title: Hamlet

Author: William Shakespeare

Release Date: November, 1998 [eBook #1524]

Language: English

*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***

{BODY}

*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***

Updated editions will replace the previous one--the old editions will
be renamed.
"""

OLD_2000S = f"""The Project Gutenberg EBook of Hamlet, by William Shakespeare

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***




Produced by the Folger volunteers



{BODY}




End of the Project Gutenberg EBook of Hamlet, by William Shakespeare

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

***** This file should be named 1524.txt or 1524.zip *****

***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN EBOOKS**START***
Why is this "Small Print!" statement here? You know: lawyers.
*END THE SMALL PRINT! FOR PUBLIC DOMAIN EBOOKS*Ver.02/11/02*END*
"""

OLD_1990S = f"""The Project Gutenberg Etext of Hamlet by Shakespeare

**Welcome To The World of Free Plain Vanilla Electronic Texts**

**Etexts Readable By Both Humans and By Computers, Since 1971**

***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***
Why is this "Small Print!" statement here?  You know: lawyers.
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

{BODY}

End of Project Gutenberg Etext of Hamlet by Shakespeare
"""


@pytest.mark.parametrize("text", [MODERN, OLD_2000S, OLD_1990S], ids=["modern", "2000s", "1990s"])
def test_strip_boilerplate_removes_gutenberg_header_and_footer(text):
    assert strip_boilerplate(text).endswith(BODY)
    assert strip_boilerplate(text).startswith(("HAMLET", "Produced by"))


@pytest.mark.parametrize(
    "start, end",
    [
        ("***START OF THE PROJECT GUTENBERG EBOOK HAMLET***", "***END OF THE PROJECT GUTENBERG EBOOK HAMLET***"),
        ("*** start of this project gutenberg ebook hamlet ***", "*** end of this project gutenberg ebook ***"),
        (
            "*** START OF THE PROJECT GUTENBERG EBOOK THE COMPLETE WORKS OF\nWILLIAM SHAKESPEARE ***",
            "End of Project Gutenberg's Hamlet, by William Shakespeare",
        ),
        ("*** START OF THE PROJECT GUTENBERG ETEXT HAMLET", "End of The Project Gutenberg Etext of Hamlet"),
    ],
)
def test_strip_boilerplate_marker_variants(start, end):
    text = f"Header line\n\n{start}\n\n{BODY}\n\n{end}\n\nFooter line\n"
    assert strip_boilerplate(text) == BODY


def test_strip_boilerplate_removes_world_library_blocks():
    notice = (
        "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\n"
        "SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS\n"
        "PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE\n"
        "WITH PERMISSION.  ELECTRONIC AND MACHINE READABLE COPIES MAY BE\n"
        "DISTRIBUTED SO LONG AS SUCH COPIES (1) ARE FOR YOUR OR OTHERS\n"
        "PERSONAL USE ONLY, AND (2) ARE NOT DISTRIBUTED OR USED\n"
        "COMMERCIALLY.  PROHIBITED COMMERCIAL DISTRIBUTION INCLUDES BY ANY\n"
        "SERVICE THAT CHARGES FOR DOWNLOAD TIME OR FOR MEMBERSHIP.>>"
    )
    text = f"{notice}\n\nACT I. SCENE I.\nWho's there?\n\n{notice}\n\nACT I. SCENE II.\nThough yet of Hamlet"
    out = strip_boilerplate(text)
    assert "<<" not in out and "WORLD LIBRARY" not in out
    assert out == "ACT I. SCENE I.\nWho's there?\n\nACT I. SCENE II.\nThough yet of Hamlet"


@pytest.mark.parametrize(
    "text",
    [
        ENGLISH,
        HAMLET,
        "  leading and trailing whitespace kept as is  \n",
        "He read to the end of the Project Gutenberg catalogue << and sighed >> *** with relief ***.",
    ],
)
def test_strip_boilerplate_leaves_other_text_unchanged(text):
    assert strip_boilerplate(text) == text


# --- words -------------------------------------------------------------------------------------


def test_words_english_keeps_apostrophes_inside_words():
    text = "Don't stop—it's O’Brien's dog, 'tis said... _really_ 3.14!"
    assert words(text) == ["Don't", "stop", "it's", "O’Brien's", "dog", "tis", "said", "really", "3", "14"]


def test_words_chinese_is_one_word_per_character():
    assert words("我们今天去北京。") == list("我们今天去北京")
    assert len(words(CLASSICAL_CHINESE)) == 139  # not one 139-character "word" per sentence


def test_words_japanese_mixed_kana_and_kanji():
    assert words("吾輩は猫である。カタカナ、人々。") == list("吾輩は猫であるカタカナ人々")


def test_words_russian_and_mixed_scripts():
    assert words("Всё смешалось в доме Облонских.") == ["Всё", "смешалось", "в", "доме", "Облонских"]
    assert words("GPT-2 говорит 你好 한국어") == ["GPT", "2", "говорит", "你", "好", "한", "국", "어"]


def test_words_keep_combining_marks_inside_words():
    assert words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs are marks, not word breaks
    assert words("e\u0301te\u0301") == ["e\u0301te\u0301"]


# --- quality_reason: realistic prose passes ----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [ENGLISH, CLASSICAL_CHINESE, MODERN_CHINESE, JAPANESE, RUSSIAN, HAMLET],
    ids=["english", "classical-chinese", "modern-chinese", "japanese", "russian", "play"],
)
def test_natural_prose_passes_every_rule(text):
    assert len(words(text)) >= 80
    assert quality_reason(text, CFG) is None
    assert clean_document(text, CFG) == (normalize(text), None)


# --- quality_reason: one rule at a time, failing and near-identical passing documents ----------


def test_too_few_words():
    ws = words(ENGLISH)
    assert quality_reason(" ".join(ws[:49]), CFG) == "too_few_words"
    assert quality_reason(" ".join(ws[:50]), CFG) is None
    assert quality_reason("... !!! ???", CleaningConfig(min_words=0)) == "too_few_words"  # no word at all


def test_too_many_words():
    cfg = CleaningConfig(max_words=len(words(ENGLISH)))
    assert quality_reason(ENGLISH + " Indeed.", cfg) == "too_many_words"
    assert quality_reason(ENGLISH, cfg) is None


def test_mean_word_length():
    # made-up words; 2 letters is below the default 2.5, 11 above the default 10
    assert quality_reason(distinct_words(60, 2), CFG) == "mean_word_length"
    assert quality_reason(distinct_words(60, 3), CFG) is None
    assert quality_reason(distinct_words(60, 11), CFG) == "mean_word_length"
    assert quality_reason(distinct_words(60, 10), CFG) is None


def test_mean_word_length_ignores_cjk_words():
    # one-character CJK words would pull the mean below 2.5; long English terms in a Chinese text
    # would push it up: neither counts when the document is mostly CJK
    text = CLASSICAL_CHINESE + " internationalization documentation"
    assert quality_reason(text, CFG) is None


def test_symbol_word_ratio():
    tags = ["#books", "#reading", "#classics", "#austen", "#romance", "#novel", "#literature", "#bookworm",
            "#fiction", "#regency", "#quotes"]
    assert quality_reason(f"{ENGLISH} {' '.join(tags)}", CFG) == "symbol_word_ratio"  # 11 / 109 > 0.1
    assert quality_reason(f"{ENGLISH} {' '.join(tags[:10])}", CFG) is None  # 10 / 108
    # ellipses count like hashes, "..." as much as "…"
    assert quality_reason("… " * 5 + ENGLISH.replace(", ", "... "), CFG) == "symbol_word_ratio"  # 10 / 98
    assert quality_reason("… " * 4 + ENGLISH.replace(", ", "... "), CFG) is None  # 9 / 98


def test_ellipsis_lines():
    lines = as_lines(ENGLISH)  # 10 lines

    def doc(k):
        return "\n".join(line + ("..." if i < k - 1 else "…" if i < k else ".") for i, line in enumerate(lines))

    assert quality_reason(doc(4), CFG) == "ellipsis_lines"  # 4 / 10 > 0.3
    assert quality_reason(doc(3), CFG) is None


def test_duplicate_lines():
    lines = as_lines(ENGLISH)
    twice = "\n".join(f"{line}\nAdvertisement\nAdvertisement" for line in lines)  # 19 repeats: 247 of 753 chars
    once = "\n".join(f"{line}\nAdvertisement" for line in lines)  # 9 repeats: 117 of 623 chars
    assert quality_reason(twice, CFG) == "duplicate_lines"
    assert quality_reason(once, CFG) is None


def test_duplicate_lines_counts_characters_not_lines():
    # most lines of this text are repeated, but they are short: by characters it is mostly new text
    text = "\n".join(f"Q.\n{line}" for line in as_lines(ENGLISH))
    assert quality_reason(text, CFG) is None


def test_top_2gram():
    cities = ["Paris", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Dublin", "Athens", "Warsaw", "Oslo",
              "Helsinki"]
    spam = [f"cheap flights to {city}" for city in cities]
    assert quality_reason(f"{ENGLISH} {', '.join(spam)}.", CFG) == "top_2gram"
    assert quality_reason(f"{ENGLISH} {', '.join(spam[:6])}.", CFG) is None


def test_top_2gram_in_chinese():
    # Each character is a word, so CJK n-grams are twice as long: the "2-gram" rule looks at 4
    # characters, about two words. "免费下载" (free download) repeated is spam.
    spam = "".join(f"免费下载{c}。" for c in "甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉戌亥春夏")
    assert quality_reason(CLASSICAL_CHINESE + spam, CFG) == "top_2gram"
    assert quality_reason(CLASSICAL_CHINESE + spam[: 6 * 6], CFG) is None  # 6 repeats: a phrase, not spam


def test_duplicate_5grams():
    phrase = "Click here to read the full story."
    assert quality_reason(" ".join([ENGLISH] + [phrase] * 4), CFG) == "duplicate_5grams"  # repeats: 81 of 513 word characters
    assert quality_reason(" ".join([ENGLISH] + [phrase] * 3), CFG) is None  # 54 of 486


def test_duplicate_5grams_in_russian():
    phrase = "Подпишитесь на наш канал, чтобы не пропустить новые выпуски."
    assert quality_reason(" ".join([RUSSIAN] + [phrase] * 4), CFG) == "duplicate_5grams"
    assert quality_reason(" ".join([RUSSIAN] + [phrase] * 3), CFG) is None


def test_alpha_words():
    numbers = [str(1000 + 37 * i) for i in range(25)]
    assert quality_reason(f"{ENGLISH} {' '.join(numbers)}", CFG) == "alpha_words"  # 98 / 123 < 0.8
    assert quality_reason(f"{ENGLISH} {' '.join(numbers[:24])}", CFG) is None  # 98 / 122


def test_first_failing_rule_is_reported():
    assert quality_reason("# # # ... short", CFG) == "too_few_words"  # also fails symbol_word_ratio


# --- clean_document ----------------------------------------------------------------------------


def test_clean_document_normalizes_and_strips_what_it_keeps():
    raw = MODERN.replace(BODY, ENGLISH.replace(" ", "\u00a0", 3) + "\u200b").replace("\n", "\r\n")
    assert clean_document(raw, CFG) == (ENGLISH, None)


def test_clean_document_empty():
    assert clean_document(" \u200b\r\n\ufeff\n", CFG) == (None, "empty")
    only_boilerplate = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***"
    assert clean_document(only_boilerplate, CFG) == (None, "empty")


def test_clean_document_reports_the_rule():
    assert clean_document("Too short.", CFG) == (None, "too_few_words")


def test_clean_document_switches():
    assert clean_document("x\u200b", CleaningConfig(enabled=False)) == ("x\u200b", None)
    raw = ENGLISH + "\u200b"
    assert clean_document(raw, CleaningConfig(normalize_unicode=False)) == (raw, None)
    assert clean_document(MODERN.replace(BODY, ENGLISH), CleaningConfig(strip_boilerplate=False))[0].startswith(
        "The Project Gutenberg eBook"
    )


def test_drop_reasons_lists_every_reason():
    assert set(DROP_REASONS) == {
        "too_few_words", "too_many_words", "mean_word_length", "symbol_word_ratio", "ellipsis_lines",
        "duplicate_lines", "top_2gram", "duplicate_5grams", "alpha_words", "empty", "pii",
    }


def test_ten_megabyte_single_line_document():
    rng = random.Random(0)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(20_000)]
    text = " ".join(rng.choices(vocab, k=1_800_000))[:10_000_000]
    kept, reason = clean_document(text, CFG)
    assert (kept is None) != (reason is None)
    assert reason is None or reason in DROP_REASONS
