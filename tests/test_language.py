import subprocess
import sys

import pytest
from pydantic import ValidationError

from llm_ray.config import CleaningConfig, ConfigError, validate
from llm_ray.config.languages import LANGID_CODES
from llm_ray.data import language
from llm_ray.data.language import NUM_WINDOWS, SAMPLE_CHARS, SUPPORTED, cjk_language, detect, keep, sample_text

# Two or three sentences of ordinary prose per language (openings of Austen, Kafka, Proust, Cervantes,
# Dante, Lu Xun, Sōseki, Tolstoy; the rest written for these tests).
TEXTS = {
    "en": "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
          "want of a wife. However little known the feelings or views of such a man may be on his first entering "
          "a neighbourhood, this truth is so well fixed in the minds of the surrounding families.",
    "de": "Als Gregor Samsa eines Morgens aus unruhigen Träumen erwachte, fand er sich in seinem Bett zu einem "
          "ungeheueren Ungeziefer verwandelt. Er lag auf seinem panzerartig harten Rücken und sah, wenn er den Kopf "
          "ein wenig hob, seinen gewölbten, braunen Bauch.",
    "fr": "Longtemps, je me suis couché de bonne heure. Parfois, à peine ma bougie éteinte, mes yeux se fermaient "
          "si vite que je n'avais pas le temps de me dire : « Je m'endors. » Et, une demi-heure après, la pensée "
          "qu'il était temps de chercher le sommeil m'éveillait.",
    "es": "En un lugar de la Mancha, de cuyo nombre no quiero acordarme, no ha mucho tiempo que vivía un hidalgo "
          "de los de lanza en astillero, adarga antigua, rocín flaco y galgo corredor. Una olla de algo más vaca "
          "que carnero consumía las tres partes de su hacienda.",
    "it": "Nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura, ché la diritta via era smarrita. "
          "Ahi quanto a dir qual era è cosa dura esta selva selvaggia e aspra e forte che nel pensier rinova la "
          "paura!",
    "pt": "Não consigo dar um nome a isto que sinto. Todas as manhãs acordo cedo, preparo o café e sento-me à "
          "janela a ver passar as pessoas que vão para o trabalho. Algumas caminham depressa, outras devagar.",
    "nl": "Het was een koude ochtend in Amsterdam. De grachten lagen stil onder een dunne laag ijs, en op de "
          "bruggen stonden mensen te kijken naar de schaatsers. Mijn vader nam ons mee naar de markt.",
    "ru": "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива по-своему. Всё "
          "смешалось в доме Облонских. Жена узнала, что муж был в связи с бывшею в их доме француженкою.",
    "el": "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας και μία από τις αρχαιότερες πόλεις του κόσμου. Κάθε χρόνο "
          "χιλιάδες επισκέπτες ανεβαίνουν στην Ακρόπολη για να δουν τον Παρθενώνα.",
    "tr": "İstanbul, Avrupa ile Asya arasında yer alan büyük ve tarihi bir şehirdir. Boğaz'ın iki yakasında "
          "milyonlarca insan yaşar ve her gün vapurlarla karşıya geçer.",
    "ar": "كان يا ما كان في قديم الزمان، كان هناك تاجر غني يعيش في مدينة بغداد. وكان لهذا التاجر ثلاثة أبناء، "
          "وكان يحبهم حبا شديدا. وفي يوم من الأيام، قرر التاجر أن يسافر إلى بلاد بعيدة ليتاجر فيها.",
    "hi": "भारत दक्षिण एशिया में स्थित एक विशाल देश है। यहाँ अनेक भाषाएँ बोली जाती हैं और हर राज्य की अपनी संस्कृति "
          "है। दिल्ली भारत की राजधानी है।",
    "zh": "我冒了严寒，回到相隔二千余里，别了二十余年的故乡去。时候既然是深冬；渐近故乡时，天气又阴晦了，冷风吹进船舱中，"
          "呜呜的响。我的心禁不住悲凉起来了。",
    "ja": "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で"
          "ニャーニャー泣いていた事だけは記憶している。",
    "ko": "나는 그때 열한 살이었다. 어머니는 아침 일찍 시장에 가셨고, 나는 동생과 함께 집을 지켰다. 창밖으로 비가 "
          "내리기 시작했고, 우리는 마루에 앉아 빗소리를 들었다.",
}


@pytest.mark.parametrize("lang", TEXTS)
def test_prose_is_detected_in_its_language(lang):
    assert detect(TEXTS[lang]) == lang


# Whichever script carries most of the text decides (a CJK character weighs 2-3 letters). Raw langid
# calls the second and fifth 'la' and the eighth 'ja': CJK bytes are taken out before it sees a
# mostly-English text, and zh/ja/ko are told apart by script.
MIXED = [
    ("en", "The sign by the door said 禁止吸烟, so we went outside to talk. It was cold. We stayed there until nine."),
    ("en", "She wrote ありがとう on the card and left it on my desk. I found it the next morning."),
    ("en", "Our hotel was in 新宿 near 東京駅. The staff spoke good English and breakfast was included in the price."),
    ("en", "The restaurant on Main Street serves excellent Peking duck (北京烤鸭), and the owner greets every guest "
           "personally. We went there twice last month and will certainly go again."),
    ("en", "My grandmother in 서울 always asked whether we had eaten, never how we were. I miss her cooking."),
    ("zh", "我们使用 PyTorch 和 DeepSpeed 在 Ray 集群上训练 GPT 模型。首先需要准备 tokenizer，然后把数据写成 parquet "
           "文件。最后用 W&B 记录训练曲线。"),
    ("zh", "这个 API 返回 JSON 格式的数据，你可以用 Python 的 requests 库调用它。如果返回 404，说明地址写错了。"),
    ("zh", "我最喜欢的日本动画是《ドラえもん》，小时候每个周末都会看。后来我还买了很多漫画书，到现在还保存着。"),
    ("ja", "このライブラリは Python で書かれており、pip install でインストールできます。詳しい使い方は README を"
           "読んでください。質問があれば GitHub の Issues にどうぞ。"),
    ("ja", "日本銀行は十九日、金融政策決定会合で大規模な金融緩和策の維持を決めた。市場の反応は小さかった。"),
    ("ko", "이 프로그램은 Python으로 작성되었으며 GitHub에서 다운로드할 수 있습니다. 설치 방법은 README 파일을 "
           "참고하세요. 문제가 있으면 이슈를 남겨 주세요."),
    ("ko", "대한민국(大韓民國)의 수도는 서울이다. 서울에는 약 천만 명이 살고 있으며, 한강이 도시를 가로질러 흐른다."),
]


@pytest.mark.parametrize("lang, text", MIXED, ids=[f"{lang}-{i}" for i, (lang, _) in enumerate(MIXED)])
def test_mixed_cjk_and_english_goes_to_the_script_carrying_the_text(lang, text):
    assert detect(text) == lang


@pytest.mark.parametrize("text, expected", [
    ("ab 中", "zh"),  # one Han character weighs 3 letters: 3 > 2
    ("abc 中", None),  # 3 = 3: not mostly CJK, langid decides
    ("abc かな", "ja"),  # a kana weighs 2 letters: 4 > 3
    ("abcd かな", None),
    ("東京都知事選挙", "zh"),  # Han alone cannot be told from Chinese (langid agrees)
    ("東京タワー", "ja"),
    ("한국어(韓國語)", "ko"),  # Hanja glossing Hangul: a tie goes to Korean
    ("Привет, 世界", None),  # Cyrillic letters count like Latin ones
])
def test_cjk_rule_weighs_scripts(text, expected):
    assert cjk_language(text, sum(map(str.isalpha, text))) == expected


@pytest.mark.parametrize("text", ["", "   \n\t", "12345 678.90", "!!! --- ??? …", "2024-01-01 12:00:00", "😀 👍 42"])
def test_text_without_letters_is_undetermined(text):
    assert detect(text) == "und"


class _CountingIdentifier:
    """langid's identifier, recording how many characters each classify call is given."""

    def __init__(self, inner):
        self.inner = inner
        self.num_chars: list[int] = []

    def classify(self, text):
        self.num_chars.append(len(text))
        return self.inner.classify(text)


@pytest.fixture
def counting(monkeypatch):
    spy = _CountingIdentifier(language._identifier())
    monkeypatch.setattr(language, "_identifier", lambda: spy)
    return spy


def test_a_1mb_document_costs_what_a_2kb_one_does(counting):
    paragraph = TEXTS["fr"] + "\n\n"
    short = (paragraph * 8)[:2_000]
    long = (paragraph * 4_000)[:1_000_000]
    assert detect(short) == detect(long) == "fr"
    chars_short, chars_long = counting.num_chars
    assert chars_long == chars_short <= SAMPLE_CHARS + NUM_WINDOWS  # windows plus their separators


def test_a_short_document_is_read_whole(counting):
    assert detect(TEXTS["de"]) == "de"
    assert counting.num_chars == [len(TEXTS["de"])]


def test_cjk_majority_needs_no_langid(counting):
    assert detect(TEXTS["ja"] * 500) == "ja"
    assert counting.num_chars == []


def test_sample_windows_skip_the_start_and_the_end():
    text = "A" * 1_000 + "B" * 10_000 + "C" * 1_000  # header, body, footer
    sample = sample_text(text)
    assert set(sample) == {"B", "\n"}
    assert len(sample) == SAMPLE_CHARS + NUM_WINDOWS - 1


def test_an_english_header_does_not_decide_a_spanish_book():
    header = ("This eBook is for the use of anyone anywhere at no cost and with almost no restrictions whatsoever. "
              "You may copy it, give it away or re-use it under the terms of the license included with this eBook. ")
    body = (TEXTS["es"] + "\n\n") * 12
    assert len(header * 5) > SAMPLE_CHARS // NUM_WINDOWS  # longer than a window: the start is skipped
    assert detect(header * 5 + body) == "es"


def test_keep_filters_only_when_languages_are_set():
    assert keep("fr", []) and keep("und", [])  # off by default: everything passes
    assert keep("zh", ["en", "zh"])
    assert not keep("fr", ["en", "zh"])
    assert not keep("und", ["en"])


def test_supported_codes_are_langids():
    model_codes = tuple(str(code) for code in language._identifier().nb_classes)
    assert LANGID_CODES == model_codes and len(LANGID_CODES) == 97
    assert SUPPORTED == set(model_codes)
    assert {detect(text) for text in TEXTS.values()} <= SUPPORTED


def test_config_and_module_import_without_langid():
    code = "import sys, llm_ray.config, llm_ray.data.language; assert 'langid' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_languages_are_lower_cased_and_off_by_default():
    assert CleaningConfig().languages == []
    assert CleaningConfig(languages=["EN", " zh ", "Ja"]).languages == ["en", "zh", "ja"]


def test_unknown_language_names_the_field_and_valid_codes():
    with pytest.raises(ConfigError) as err:
        validate({"cleaning": {"languages": ["en", "xx"]}})
    message = str(err.value)
    assert "cleaning.languages" in message and "'xx'" in message and "e.g. en, zh" in message
    with pytest.raises(ValidationError, match=r"cleaning\.languages"):  # named also outside the root config
        CleaningConfig(languages=["xx"])


@pytest.mark.parametrize("code, guess", [("zh-CN", "zh"), ("en_US", "en"), ("jp", "ja"), ("kr", "ko")])
def test_unknown_language_suggests_a_code(code, guess):
    with pytest.raises(ValidationError, match=f"did you mean '{guess}'"):
        CleaningConfig(languages=[code])
