"""Log-probabilities in OpenAI's two layouts: legacy completions and chat.

Completions (what lm-eval-harness reads): ``{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}``, one entry per token; ``top_logprobs`` maps token text to log-probability,
the k most likely plus the chosen token (as OpenAI does), and an echoed prompt's first token
has ``null`` in both. ``text_offset`` is each token's character offset in the choice's text.

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.

A token's text is its own decoding: a token holding part of a UTF-8 character decodes to the
replacement character, as in vLLM.
"""

from __future__ import annotations

from functools import lru_cache

from llm_ray.serve.engine import TokenLogprob


class TokenTexts:
    """Token ids to text, for one tokenizer: single tokens (cached) and prefix lengths."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.piece = lru_cache(maxsize=65536)(self._piece)

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def length(self, tokens: list[int]) -> int:
        """Characters of the text of tokens (as the completion's text is decoded)."""
        return len(self.tokenizer.decode(tokens, skip_special_tokens=True)) if tokens else 0


class LegacyLogprobs:
    """One choice's legacy logprobs, built piece by piece (a stream sends each piece's tokens);
    an echoed prompt's tokens are the first piece."""

    def __init__(self, texts: TokenTexts):
        self.texts = texts
        self.tokens: list[int] = []  # every token so far, for the offsets

    def piece(self, entries: list[TokenLogprob | None], tokens: list[int] | None = None) -> dict:
        """The layout for the next tokens: entries (None: no log-probability, an echo's first token).
        tokens: their ids when entries lack them (an echoed prompt whose log-probabilities were not asked)."""
        ids = tokens if tokens is not None else [e.token for e in entries]
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, (token, entry) in enumerate(zip(ids, entries)):
            out["tokens"].append(self.texts.piece(token))
            out["text_offset"].append(self.texts.length(self.tokens))
            self.tokens.append(token)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {self.texts.piece(t): lp for t, lp in entry.top}
            top.setdefault(self.texts.piece(entry.token), entry.logprob)
            out["token_logprobs"].append(entry.logprob)
            out["top_logprobs"].append(top)
        return out


def merge(pieces: list[dict]) -> dict | None:
    """Legacy layouts of consecutive pieces as one."""
    if not pieces:
        return None
    return {key: [v for p in pieces for v in p[key]] for key in pieces[0]}


def chat_logprobs(texts: TokenTexts, entries: list[TokenLogprob], k: int) -> dict:
    """The chat layout for entries, with k alternatives per token."""
    def item(token: int, logprob: float) -> dict:
        text = texts.piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:k]]}
                        for e in entries]}
