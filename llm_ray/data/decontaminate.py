"""The screens a cleaned document passes after the quality rules: language, then contamination.

``Screens`` is built once per prepare run and shared by every cleaning task through Ray's object
store: the allowed languages (cleaning.languages) and the word 13-gram index of the evaluation
sets named by data.decontaminate (``ngrams.EvalIndex``: sorted 64-bit hashes, a few bytes per
evaluation n-gram). A training document that covers more than data.decontaminate_threshold of one
evaluation document's 13-grams is dropped with reason ``contamination``; the report lists a few.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from llm_ray.config import Config, DataConfig
from llm_ray.data import doc_stats, language, ngrams, stages
from llm_ray.data.dedup import shingle_units
from llm_ray.data.errors import PrepareError
from llm_ray.data.sources import ReadError, iter_documents

NGRAM = 13  # word n-grams, as GPT-3's and most later decontamination studies use


@dataclass
class Screens:
    languages: tuple[str, ...] = ()
    index: ngrams.EvalIndex | None = None
    eval_keys: list[str] = field(default_factory=list)  # evaluation document keys, by index document id
    threshold: float = 1.0
    short_eval_docs: int = 0  # evaluation documents of fewer than NGRAM words: never matched

    def check(self, key: str, text: str, stats: dict) -> tuple[str | None, str | None]:
        """(text, None) when the document passes, (None, reason) when it is dropped; counts languages
        and keeps a few contamination examples in stats (doc_stats)."""
        if self.languages:
            lang = language.detect(text)
            stats["languages"][lang] += 1
            if not language.keep(lang, self.languages):
                return None, "language"
        if self.index is not None:
            doc, share = ngrams.overlap_with(self.index, ngrams.ngram_hashes(text, NGRAM))
            if share > self.threshold:
                if len(stats["contamination_examples"]) < doc_stats.EXAMPLES:
                    stats["contamination_examples"].append(
                        {"document": key, "evaluation_document": self.eval_keys[doc], "share": round(share, 3)})
                return None, "contamination"
        return text, None


def index_evaluation_sets(uris: list[str], data: DataConfig) -> tuple[ngrams.EvalIndex, list[str], int]:
    """The 13-gram index of every document of the evaluation files, their keys, and how many have fewer
    than 13 words (their one hash, of all their words, matches no training 13-gram: such short items
    are not decontaminated, and the log says how many there are). A file that cannot be read fails the
    run: a silently skipped evaluation set would leave its documents in training."""
    keys, per_doc, short = [], [], 0
    for uri in uris:
        try:
            for key, text in iter_documents(uri, data, Counter()):
                keys.append(key)
                per_doc.append(ngrams.ngram_hashes(text, NGRAM))
                short += len(shingle_units(text, "word")) < NGRAM
        except ReadError as e:
            raise PrepareError(f"data.decontaminate: {uri}: {e}") from None
    if not keys:
        raise PrepareError(f"data.decontaminate: {', '.join(uris)} hold no documents")
    return ngrams.index_of(per_doc), keys, short


def _screens_task(languages: list[str], uris: list[str], data: dict, threshold: float) -> Screens:
    if not uris:
        return Screens(tuple(languages))
    index, keys, short = index_evaluation_sets(uris, DataConfig.model_validate(data))
    return Screens(tuple(languages), index, keys, threshold, short)


def build_screens(cfg: Config, eval_sets: list, log):
    """A reference to the run's Screens, built in a task (evaluation sets may sit in S3)."""
    ref = stages.task(_screens_task).remote(cfg.cleaning.languages, [f.uri for f in eval_sets],
                                            cfg.data.model_dump(), cfg.data.decontaminate_threshold)
    if eval_sets:  # the index stays in the object store; errors (an unreadable set) surface here
        docs, hashes, short = stages.result(stages.task(_size).remote(ref))
        log(f"documents: decontaminating against {docs} evaluation documents ({hashes:,} distinct "
            f"{NGRAM}-grams) from {len(eval_sets)} files"
            + (f"; {short} of them have fewer than {NGRAM} words and cannot be matched" if short else ""))
    return ref


def _size(screens: Screens) -> tuple[int, int, int]:
    return len(screens.eval_keys), len(screens.index.hashes), screens.short_eval_docs
