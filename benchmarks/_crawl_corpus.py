"""A generated corpus in the shapes real crawls have, for benchmarks/prepare_scale.py.

    python benchmarks/_crawl_corpus.py OUT [--scale 0.01]   # writes the corpus and OUT/corpus.json

One stream of documents, written at once in several shapes (every shape a contiguous range of the
stream, so a document's id is its file's first id plus its line number minus one):

- ordinary documents: random sentences drawn with Zipf frequencies from a vocabulary per language
  (a few hundred real common words at the top ranks, so that langid recognises the language, then
  words spliced from pieces of them), 200 to 3,000 words, all distinct; 90% English, the rest
  German, French, Spanish and Chinese (common Han characters);
- planted near-duplicates: 5% of ordinary documents copied up to 200 documents later with 3% of
  their words changed or a header line added;
- templated pages: one ~300-word product page whose name, item number and price change, interleaved.

Shapes: one .jsonl.zst of all of it, the same over 100 .jsonl.zst files, a .jsonl.zst prefix of it
(the small single file) and an uncompressed .jsonl prefix (for the former pipeline, which reads no
.zst). Each line is {"text": ..., "id": ...}. Documents are rendered from word-id arrays with numpy
(one join per document, no loop per word): about 1 GB of text a few minutes on one core.
"""

from __future__ import annotations

import argparse
import heapq
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

LANGUAGES = ("en", "de", "fr", "es", "zh")
LANGUAGE_SHARES = (0.90, 0.025, 0.025, 0.025, 0.025)
MIN_WORDS, MAX_WORDS = 200, 3_000
COPY_SHARE = 0.05  # ordinary documents planted again as a near-duplicate
EDIT_SHARE = 0.03  # words changed in an edited copy
COPY_DELAY = (1, 200)  # a copy comes this many documents after its original (crossing shards)
NUM_FILES = 100
ZSTD = {"compression": "zstd", "buffer_size": 1 << 20}  # compressed in 1 MiB pieces, not line by line
ZIPF_S = 1.0

# Kinds of document in the stream (planted.npz "kind").
ORDINARY, COPY, TEMPLATE = 0, 1, 2

# Real common words, most frequent first: the top ranks of each vocabulary.
COMMON_WORDS = {
    "en": """the of and to a in is it you that he was for on are with as his they be at one have this from or
had by not word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down side been
now find any new work part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line differ turn cause much
mean before move right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light kind off need
house picture try us again animal point mother world near build self earth father head stand own page should
country found answer school grow study still learn plant cover food sun four between state keep eye never last
let thought city tree cross farm hard start might story saw far sea draw left late run while press close night
real life few north open seem together next white children begin got walk example ease paper group always music
those both mark often letter until mile river car feet care second book carry took science eat room friend began
idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual young
ready above ever red list though feel talk bird soon body dog family direct pose leave song measure door product
black short numeral class wind question happen complete ship area half rock order fire south problem piece told
knew pass since top whole king space heard best hour better true during hundred five remember step early hold
west ground interest reach fast verb sing listen six table travel less morning ten simple several vowel toward
war lay against pattern slow center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest
correct able pound done beauty drive stood contain front teach week final gave green quick develop ocean warm
free minute strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel
full force blue object decide surface deep moon island foot system busy test record boat common gold possible
plane dry wonder laugh thousand ago ran check game shape hot miss brought heat snow tire bring yes distant fill
east paint language among""",
    "de": """der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden
aus er hat dass sie nach wird bei einer um am sind noch wie einem über einen so zum war haben nur oder aber vor
zur bis mehr durch man sein wurde sei hatte kann gegen vom können schon wenn habe seine ihre dann unter wir soll
ich eines jahr zwei jahren diese dieser wieder keine seiner worden will zwischen immer was sagte gibt alle seit
muss doch jetzt drei neue damit bereits da ab ihr ihren ihrer kein sowie heute seinen diesem prozent beim sehr
ersten beiden dabei weil hier sollen selbst neuen waren wurden deutschen land diesen dort stadt ohne wo sondern
regierung nun etwa unternehmen viele werde müssen ganz zeit deutschland kinder menschen frau mann arbeit leben
weg welt hause geld haus frage recht teil ende schule straße wasser sprache buch woche morgen abend nacht tag
jahre freund freunde stunde gut groß klein neu alt lang kurz hoch viel wenig zweite letzten eigenen großen
kleinen guten deutsche politik wirtschaft geschichte gesellschaft entwicklung möglichkeit beispiel bedeutung
zusammen gemeinsam dagegen deshalb trotzdem allerdings wirklich natürlich vielleicht eigentlich besonders
manchmal schließlich gestern endlich wichtig richtig schwer leicht einfach gehen kommen machen sagen sehen geben
stehen lassen finden bleiben liegen heißen denken nehmen tun dürfen glauben halten nennen zeigen führen sprechen
bringen fahren meinen fragen kennen gelten stellen spielen arbeiten brauchen folgen lernen bestehen verstehen
setzen bekommen beginnen erzählen versuchen schreiben laufen erklären entsprechen sitzen ziehen scheinen fallen
gehören entstehen erhalten treffen suchen legen vorstellen handeln erreichen tragen schaffen lesen verlieren
darstellen erkennen entwickeln reden aussehen erscheinen bilden anfangen erwarten wohnen betreffen warten
vergehen helfen gewinnen schließen fühlen bieten interessieren erinnern ergeben anbieten studieren verbinden
ansehen fehlen bedeuten vergleichen""",
    "fr": """le de un être et à il avoir ne je son que se qui ce dans en du elle au pour pas vous par sur faire
plus dire me on mon lui nous comme mais pouvoir avec tout y aller voir bien où sans tu ou leur homme si deux moi
vouloir te femme venir quand grand celui notre devoir là jour prendre même votre rien petit encore aussi quelque
dont mer trouver donner temps ça peu falloir sous parler alors main chose ton mettre vie savoir yeux passer autre
après regarder toujours puis jamais cela aimer non heure croire cent monde donc enfant fois seul entre vers chez
demander jeune jusque très moment rester répondre tête père fille mille premier car entendre ni bon trois cœur an
quatre terre contre dieu monsieur voix penser quel arriver maison devant coup beau connaître devenir air mot nuit
sentir histoire porte pays ville ainsi depuis pendant gens place question travail eau parce toute cette ces
elles leurs sont était avait fait été peut ont aux nos vos mes ses étaient sera serait beaucoup déjà ici
maintenant souvent longtemps hier demain ensemble pourquoi comment combien personne chaque plusieurs quelques
certains autres nouvelle nouveau ancienne première dernière grande petite bonne belle vieille blanc noir rouge
vert bleu français france gouvernement politique société économie entreprise école université livre lettre
journal année semaine mois matin soir ami amie frère sœur mère famille enfants travailler manger boire dormir
écrire lire ouvrir fermer partir sortir entrer tomber commencer finir continuer chercher perdre gagner payer
acheter vendre jouer chanter marcher courir porter montrer comprendre apprendre attendre descendre rendre vivre
mourir naître suivre recevoir apercevoir""",
    "es": """de la que el en y a los se del las un por con no una su para es al lo como más pero sus le ya o este
sí porque esta entre cuando muy sin sobre también me hasta hay donde quien desde todo nos durante todos uno les
ni contra otros ese eso ante ellos e esto mí antes algunos qué unos yo otro otras otra él tanto esa estos mucho
quienes nada muchos cual poco ella estar estas algunas algo nosotros mi mis tú te ti tu tus ellas nuestro
nuestra esos esas estoy estás está estamos están estaba estaban estuvo fue fueron era eran ser soy eres somos
son sea será sería tengo tiene tenemos tienen tenía tuvo hacer hace hecho hizo decir dijo dice ir va van iba ver
visto poder puede pueden podía dar dio saber sabe querer quiere llegar llega pasar pasa deber debe poner pone
parecer parece quedar queda creer cree hablar habla llevar lleva dejar deja seguir sigue encontrar encuentra
llamar llama venir viene pensar piensa salir sale volver vuelve tomar toma conocer conoce vivir vive sentir
siente tratar trata mirar mira contar cuenta empezar empieza esperar espera buscar busca existir existe entrar
entra trabajar trabaja escribir escribe perder pierde producir produce ocurrir ocurre entender entiende pedir
pide recibir recibe recordar recuerda terminar termina permitir permite aparecer aparece conseguir consigue
comenzar comienza servir sirve necesitar necesita mantener mantiene resultar resulta leer lee cambiar cambia
presentar presenta crear crea abrir abre considerar considera acabar acaba convertir convierte ganar gana formar
forma traer trae morir muere aceptar acepta realizar realiza lograr logra explicar explica año años día días vez
veces tiempo casa mundo vida hombre mujer país ciudad gobierno parte caso lugar trabajo manera momento persona
personas gente historia agua noche mano ojos padre madre hijo hija familia amigo amigos señor señora palabra
nombre tierra guerra calle escuela libro mañana tarde semana mes grande pequeño nuevo nueva viejo bueno buena
mejor mayor menor primero primera último última español españa nacional social política económica general
público pública""",
    "zh": """的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去行过家
十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从知使把现长
两因本等明手间什意外问力理实正新期高通少加应头西文民提内重又情走把已开道相回全位各话结山水身关机物品
做东样美较电北气变合果特表利教先老路白海金几百次平入书门市员保别建立直量五带件记清区界治报领信完问题
入员名外解科向解真且告社近认条千少院口步形象打量总线运片张处边报原更反术被义计数四接争设满风代决系程
听何受政或知非部统快求空南强即业制论任再场则活思认号观况青容红色花光管连万完调今物取每安吃觉死更条认
师交求决达具极件非农声单红花钱城感收往路离难改落写请虽字跟拉站坐火近远半母父朋友孩早晚星期春夏秋冬雨
雪云河湖林草树鱼鸟马牛羊狗猫饭菜茶酒米肉鸡蛋衣服鞋帽车船飞机场站票医病药体育球馆校园班级课本笔纸桌椅""",
}

# Sentence punctuation of each language, as (word separator, comma, full stop).
PUNCTUATION = {"zh": ("", "，", "。")}
DEFAULT_PUNCTUATION = (" ", ",", ".")


@dataclass(frozen=True)
class Vocabulary:
    """Rendered word forms of one language: the V words in each variant (plain, capitalised, with a
    comma, with a full stop, capitalised with a full stop, closing a paragraph), so that a document is
    forms[variant * V + word].tolist() joined: no Python per word."""

    forms: np.ndarray  # (variants * V,) object: variant v of word w at v * V + w
    table: np.ndarray  # (SAMPLE_TABLE,) word ids in Zipf proportions: a draw is one random index
    separator: str

    @property
    def size(self) -> int:
        return len(self.forms) // NUM_VARIANTS


PLAIN, CAPITAL, COMMA, STOP, CAPITAL_STOP, PARAGRAPH = range(6)
NUM_VARIANTS = 6
SAMPLE_TABLE = 1 << 20  # Zipf frequencies quantised to 1/1M: even the rarest word has a few entries


def build_vocabulary(language: str, size: int, rng: np.random.Generator) -> Vocabulary:
    common = list(dict.fromkeys(COMMON_WORDS[language].split() if language != "zh"
                                else "".join(COMMON_WORDS["zh"].split())))
    if language == "zh":
        words = common  # characters: a few hundred are enough variety
    else:
        # Spliced words: the start of one real word and the end of another, so their letter n-grams
        # stay those of the language (langid reads letter n-grams).
        long = [w for w in common if len(w) >= 3]
        words, seen = list(common), set(common)
        while len(words) < size:
            a, b = long[rng.integers(len(long))], long[rng.integers(len(long))]
            w = a[: rng.integers(2, len(a) + 1)] + b[rng.integers(1, len(b) - 1):]
            if w not in seen and len(w) <= 12:
                seen.add(w)
                words.append(w)
    sep, comma, stop = PUNCTUATION.get(language, DEFAULT_PUNCTUATION)
    capital = [w[:1].upper() + w[1:] for w in words]
    forms = np.array(words + capital + [w + comma for w in words] + [w + stop for w in words]
                     + [w + stop for w in capital] + [w + stop + "\n\n" for w in words], dtype=object)
    weights = 1.0 / np.arange(1, len(words) + 1) ** ZIPF_S
    cdf = np.cumsum(weights) / weights.sum()
    table = np.minimum(np.searchsorted(cdf, (np.arange(SAMPLE_TABLE) + 0.5) / SAMPLE_TABLE), len(words) - 1)
    return Vocabulary(forms, table.astype(np.int32), sep)


def draw_words(vocab: Vocabulary, n: int, rng: np.random.Generator) -> np.ndarray:
    return vocab.table[rng.integers(0, SAMPLE_TABLE, n)]


def sentence_forms(n: int, rng: np.random.Generator) -> np.ndarray:
    """The variant of each of n words: sentences of 6 to 24 words, a capital first word, a full stop
    after the last, a comma now and then, a paragraph break after every ~5 sentences."""
    lengths = rng.integers(6, 25, size=n // 6 + 2)
    ends = np.cumsum(lengths)
    ends = ends[ends < n]
    form = np.where(rng.random(n) < 0.06, COMMA, PLAIN)
    form[np.r_[0, ends]] = CAPITAL
    stops = np.r_[ends - 1, n - 1]
    form[stops] = np.where(rng.random(len(stops)) < 0.2, PARAGRAPH, STOP)
    form[n - 1] = STOP
    form[0] = CAPITAL_STOP if n == 1 else CAPITAL
    return form


def render(vocab: Vocabulary, word_ids: np.ndarray, forms: np.ndarray) -> str:
    text = vocab.separator.join(vocab.forms[forms * vocab.size + word_ids].tolist())
    return text.replace("\n\n ", "\n\n") if vocab.separator else text


@dataclass
class Draft:
    """A document as word ids (kept until its planted copy is written)."""

    language: int
    word_ids: np.ndarray
    forms: np.ndarray  # each word's variant (sentence_forms)


class Generator:
    def __init__(self, seed: int, vocab_size: int = 30_000):
        self.rng = np.random.default_rng(seed)
        self.vocab = [build_vocabulary(lang, vocab_size if lang == "en" else vocab_size // 3, self.rng)
                      for lang in LANGUAGES]
        self.template = self._template()

    def ordinary(self) -> Draft:
        language = int(self.rng.choice(len(LANGUAGES), p=LANGUAGE_SHARES))
        n = int(self.rng.integers(MIN_WORDS, MAX_WORDS + 1))
        return Draft(language, draw_words(self.vocab[language], n, self.rng), sentence_forms(n, self.rng))

    def copy_of(self, draft: Draft) -> str:
        """A near-duplicate: 3% of the words changed, or a header line added."""
        vocab = self.vocab[draft.language]
        if self.rng.random() < 0.5:
            ids = draft.word_ids.copy()
            where = self.rng.choice(len(ids), max(1, int(len(ids) * EDIT_SHARE)), replace=False)
            ids[where] = draw_words(vocab, len(where), self.rng)
            return render(vocab, ids, draft.forms)
        header = render(vocab, draw_words(vocab, 8, self.rng), sentence_forms(8, self.rng))
        return f"{header}\n\n{render(vocab, draft.word_ids, draft.forms)}"

    def _template(self) -> str:
        """An e-commerce page of ~300 words with {name}, {item} and {price} slots."""
        en = self.vocab[0]
        parts = [render(en, draw_words(en, n, self.rng), sentence_forms(n, self.rng)) for n in (90, 110, 90)]
        return ("{name} | Item {item}\n\nPrice: ${price}. Free delivery on orders over $50.\n\n"
                + parts[0] + "\n\nWhy customers choose the {name}: " + parts[1]
                + "\n\nShipping and returns. " + parts[2] + "\n\nOrder the {name} today for ${price}.")

    def templated(self) -> str:
        en = self.vocab[0]
        name = " ".join(en.forms[CAPITAL * en.size + self.rng.integers(1_000, en.size, 3)].tolist())  # spliced
        return self.template.format(name=name, item=f"{self.rng.integers(10_000, 99_999)}-"
                                    f"{self.rng.integers(100, 999)}",
                                    price=f"{self.rng.integers(5, 900)}.{self.rng.integers(0, 100):02d}")


class Outputs:
    """The stream's writers: every shape is a contiguous range of document ids."""

    def __init__(self, out: Path, text_bytes: int, prefix_bytes: int, plain_bytes: int):
        self.out, self.per_file = out, text_bytes / NUM_FILES
        (out / "single").mkdir(parents=True)
        (out / "files").mkdir()
        (out / "prefix").mkdir()
        (out / "plain").mkdir()
        self.single = pa.output_stream(str(out / "single" / "corpus.jsonl.zst"), **ZSTD)
        self.prefix = pa.output_stream(str(out / "prefix" / "corpus.jsonl.zst"), **ZSTD)
        self.plain = open(out / "plain" / "corpus.jsonl", "wb")
        self.limits = {"prefix": prefix_bytes, "plain": plain_bytes}
        # Per shape: its files as [path, id of the file's first document], documents, bytes of text.
        self.shapes = {name: {"files": [[str(out / name / f"corpus.{suffix}"), 0]], "docs": 0, "text_bytes": 0}
                       for name, suffix in (("single", "jsonl.zst"), ("prefix", "jsonl.zst"), ("plain", "jsonl"))}
        self.shapes["files"] = {"files": [], "docs": 0, "text_bytes": 0}
        self.part, self.part_index = None, -1

    def write(self, doc_id: int, text: str) -> None:
        line = (json.dumps({"text": text, "id": doc_id}, ensure_ascii=False) + "\n").encode("utf-8")
        size = len(text.encode("utf-8"))
        written = self.shapes["single"]["text_bytes"]
        index = min(NUM_FILES - 1, int(written // self.per_file))
        if index != self.part_index:
            if self.part is not None:
                self.part.close()
            path = self.out / "files" / f"part-{index:03d}.jsonl.zst"
            self.part, self.part_index = pa.output_stream(str(path), **ZSTD), index
            self.shapes["files"]["files"].append([str(path), doc_id])
        self.part.write(line)
        self.single.write(line)
        for name in ("single", "files"):
            self._count(name, size)
        for name, stream in (("prefix", self.prefix), ("plain", self.plain)):
            if self.shapes[name]["text_bytes"] < self.limits[name]:  # a prefix: written until full
                stream.write(line)
                self._count(name, size)

    def _count(self, name: str, size: int) -> None:
        self.shapes[name]["docs"] += 1
        self.shapes[name]["text_bytes"] += size

    def close(self) -> dict:
        for stream in (self.single, self.prefix, self.plain, self.part):
            stream.close()
        return self.shapes


def write_corpus(out: Path, text_mb: float, prefix_mb: float, plain_mb: float, templated_pages: int,
                 seed: int = 0) -> dict:
    """Write the stream's shapes under out; return (and write to out/corpus.json) what was planted."""
    out = out.resolve()  # the pipeline's document keys hold resolved paths
    gen = Generator(seed)
    rng = gen.rng
    target = int(text_mb * 1e6)
    outputs = Outputs(out, target, int(prefix_mb * 1e6), int(plain_mb * 1e6))
    # Templated pages spread evenly (at random) over the stream: their share of the documents.
    mean_ordinary = np.mean([len(render(gen.vocab[d.language], d.word_ids, d.forms).encode())
                             for d in (gen.ordinary() for _ in range(100))])
    mean_template = len(gen.templated().encode())
    ordinary_docs = max(1.0, (target - templated_pages * mean_template) / (mean_ordinary * (1 + COPY_SHARE)))
    template_share = min(0.95, 1.05 * templated_pages / (templated_pages + ordinary_docs * (1 + COPY_SHARE)))
    languages, kinds, pairs = [], [], []
    pending: list[tuple[int, int, Draft]] = []  # planted copies due: (write at doc id, original id, draft)
    templates = 0
    doc_id = 0
    while outputs.shapes["single"]["text_bytes"] < target or templates < templated_pages or pending:
        if pending and pending[0][0] <= doc_id:
            _, original, draft = heapq.heappop(pending)
            text, kind, lang = gen.copy_of(draft), COPY, draft.language
            pairs.append((original, doc_id))
        elif templates < templated_pages and (rng.random() < template_share
                                              or outputs.shapes["single"]["text_bytes"] >= target):
            text, kind, lang = gen.templated(), TEMPLATE, 0
            templates += 1
        elif outputs.shapes["single"]["text_bytes"] < target:
            draft = gen.ordinary()
            text, kind, lang = render(gen.vocab[draft.language], draft.word_ids, draft.forms), ORDINARY, draft.language
            if rng.random() < COPY_SHARE:
                heapq.heappush(pending, (doc_id + int(rng.integers(*COPY_DELAY)), doc_id, draft))
        else:  # only copies still to come: write them now
            pending = [(doc_id, *rest) for _, *rest in pending]
            heapq.heapify(pending)
            continue
        outputs.write(doc_id, text)
        languages.append(lang)
        kinds.append(kind)
        doc_id += 1
    shapes = outputs.close()
    np.savez(out / "planted.npz", language=np.array(languages, dtype=np.int8), kind=np.array(kinds, dtype=np.int8),
             pairs=np.array(pairs, dtype=np.int64).reshape(-1, 2))
    info = {"shapes": shapes, "languages": list(LANGUAGES), "planted": str(out / "planted.npz"),
            "pairs": len(pairs), "templated_pages": templates, "docs": doc_id}
    (out / "corpus.json").write_text(json.dumps(info, indent=1))
    return info


def load_planted(info: dict) -> dict[str, np.ndarray]:
    with np.load(info["planted"]) as f:
        return {k: f[k] for k in f.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to create")
    parser.add_argument("--scale", type=float, default=1.0, help="1.0: 1 GB of text, 20,000 templated pages")
    parser.add_argument("--plain-mb", type=float, default=300.0, help="size of the uncompressed .jsonl prefix")
    args = parser.parse_args()
    info = write_corpus(args.out, 1000 * args.scale, 100 * args.scale, args.plain_mb, int(20_000 * args.scale))
    print(json.dumps({k: v for k, v in info.items() if k != "shapes"}))
    for name, shape in info["shapes"].items():
        print(f"{name}: {len(shape['files'])} files, {shape['docs']} documents, {shape['text_bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
