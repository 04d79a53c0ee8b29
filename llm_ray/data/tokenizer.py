"""Byte-level BPE with Hugging Face `tokenizers`: any UTF-8 text round-trips exactly."""

from __future__ import annotations

from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOT, PAD]


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, sample_bytes: int) -> Tokenizer:
    """Learn BPE merges on at most sample_bytes of texts."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(_take_bytes(texts, sample_bytes), trainer=trainer)
    return tokenizer


def _take_bytes(texts: Iterable[str], limit: int) -> Iterator[str]:
    """Texts up to limit UTF-8 bytes in all; the last one cut at a character boundary."""
    used = 0
    for text in texts:
        if used >= limit:
            return
        raw = text.encode("utf-8")
        if used + len(raw) > limit:
            text = raw[: limit - used].decode("utf-8", errors="ignore")  # drops a partial character
            raw = text.encode("utf-8")
        used += len(raw)
        yield text


def eot_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOT)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOT} token")
    return token_id
