"""Response bodies from a request's engine events, for completions and for chat.

The server hands each event (choice index, new text, finish reason, log-probabilities) to a
shape's ``piece``; a stream sends the pieces as chunks, a whole response ``merge``s each
choice's pieces. An echoed prompt (completions) comes with the choice's first piece.
"""

from __future__ import annotations

from llm_ray.serve import api, chat
from llm_ray.serve.logprobs import LegacyLogprobs, TokenTexts, chat_logprobs, merge


class Completions:
    def __init__(self, cid: str, model: str, texts: TokenTexts, request: api.CompletionRequest,
                 prompt_texts: list[str], prompt_ids: list[list[int]], submitted: list):
        self.cid, self.model, self.texts = cid, model, texts
        self.n, self.echo, self.logprobs = request.n, request.echo, request.logprobs
        self.prompt_texts, self.prompt_ids, self.submitted = prompt_texts, prompt_ids, submitted
        self.legacy: dict[int, LegacyLogprobs] = {}

    def piece(self, index: int, text: str, finish: str | None, entries, first: bool) -> dict:
        p = index // self.n
        parts = []
        if first and self.echo:
            text = self.prompt_texts[p] + text
            if self.logprobs is not None:
                prompt_entries = self.submitted[p].prompt_logprobs or [None] * len(self.prompt_ids[p])
                parts.append(self._legacy(index).piece(prompt_entries, self.prompt_ids[p]))
        if self.logprobs is not None:
            parts.append(self._legacy(index).piece(entries or []))
        return api.choice(index, text, finish, merge(parts))

    def _legacy(self, index: int) -> LegacyLogprobs:
        return self.legacy.setdefault(index, LegacyLogprobs(self.texts))

    def merge(self, index: int, pieces: list[dict]) -> dict:
        return api.choice(index, "".join(p["text"] for p in pieces), pieces[-1]["finish_reason"],
                          merge([p["logprobs"] for p in pieces if p["logprobs"]]) if self.logprobs is not None
                          else None)

    def body(self, choices: list[dict], usage: dict | None) -> dict:
        return api.completion(self.cid, self.model, choices, usage)

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        return api.completion(self.cid, self.model, choices, usage)


class Chat:
    def __init__(self, cid: str, model: str, texts: TokenTexts, request: chat.ChatRequest):
        self.cid, self.model, self.texts = cid, model, texts
        self.logprobs = (request.top_logprobs or 0) if request.logprobs else None

    def piece(self, index: int, text: str, finish: str | None, entries, first: bool) -> dict:
        logprobs = chat_logprobs(self.texts, entries or [], self.logprobs) if self.logprobs is not None else None
        return chat.chunk_choice(index, text, finish, logprobs, first=first)

    def merge(self, index: int, pieces: list[dict]) -> dict:
        logprobs = None
        if self.logprobs is not None:
            logprobs = {"content": [item for p in pieces for item in p["logprobs"]["content"]]}
        return chat.choice(index, "".join(p["delta"].get("content", "") for p in pieces),
                           pieces[-1]["finish_reason"], logprobs)

    def body(self, choices: list[dict], usage: dict | None) -> dict:
        return chat.completion(self.cid, self.model, choices, usage)

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        return chat.completion(self.cid, self.model, choices, usage, chunk=True)
