"""Generated tokens to text, released only once final: whole characters, never part of a stop string."""

from __future__ import annotations

# What the tokenizer's byte-level decoder puts in place of an incomplete UTF-8 character.
REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one sequence's generated tokens, handed out in pieces as tokens arrive.

    ``add`` returns the text that became final with the new token: a character still missing
    bytes, or a tail that could be the start of a stop string, waits for the next token. When a
    stop string appears, the text before it is the last piece and the stream reports it.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.sent = 0  # characters handed out so far
        self.stopped = False

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append a token; return the text that became final (possibly empty)."""
        self.tokens.append(token)
        text = self.text()
        hits = [i for i in (text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(text, min(hits))
        end = len(text.rstrip(REPLACEMENT)) if text.endswith(REPLACEMENT) else len(text)
        return self._release(text, end - self._stop_prefix(text[:end]))

    def flush(self) -> str:
        """The rest of the text, at the end of the sequence (an incomplete character included)."""
        return "" if self.stopped else self._release(self.text(), None)

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of text that is the beginning of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text) - self.sent), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _release(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece
