"""The built-in generator: many requests at once over one KV cache, with continuous batching.

Plain PyTorch and the tokenizer; Ray Serve wraps it from the outside (``serve.app``).

Each choice of a request (a *sequence*) owns one row of a preallocated KV cache. At every
decoding step the engine admits waiting requests into free rows (one prefill pass over the
prompt, copied to the rows of the request's other choices), then runs one forward pass over
all running rows, each at its own position (``KVCache`` keeps a length per row), and samples
one token per row with that sequence's own settings and random generator. A sequence leaves
at end-of-text, at a stop string or at ``max_tokens``, and its row is free for the next
request at the following step: requests join and leave the batch at every step.

Chunked prefill: with ``prefill_chunk`` set, a step prefills at most that many prompt tokens
(after decoding one token in every running row), so a long prompt is taken in pieces over
several steps and the running streams keep getting a token per step meanwhile.

Log-probabilities (``Sampling.logprobs``) are those of the model's own distribution, before
temperature and top-k/top-p: the chosen token's and the k most likely. With ``echo`` they are
also computed for the prompt's tokens (the first has none), from the prefill's logits.

Sampling is per row, from per-sequence generators, so a request's output does not depend on
what else is in the batch: batched output equals unbatched output for the same seeds.
"""

from __future__ import annotations

import queue
import secrets
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from llm_ray.model import GPT, KVCache, filter_logits
from llm_ray.serve.text import TextStream


@dataclass(frozen=True)
class Sampling:
    """One request's settings (OpenAI's names). temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    echo: bool = False  # with logprobs: the prompt's tokens' log-probabilities too (Request.prompt_logprobs)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the most likely tokens at its position, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


# on_event(choice index, new text, finish reason or None, log-probabilities of the tokens since the
# previous event or None when not asked for): called from step(), in the thread that steps.
OnEvent = Callable[[int, str, "str | None", "list[TokenLogprob] | None"], None]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Log-probabilities of tokens (T,) under logits (T, V), with the k most likely at each position."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens[:, None].long())[:, 0].tolist()
    if k:
        values, ids = logp.topk(min(k, logp.size(-1)), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens.tolist(), chosen, tops)]


@dataclass
class Sequence:
    index: int  # the choice's index within its request
    generator: torch.Generator
    stream: TextStream
    last: int = 0  # the latest token, the next step's input
    generated: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens not yet handed out in an event


@dataclass
class Request:
    prompt: list[int]
    sampling: Sampling
    on_event: OnEvent
    sequences: list[Sequence] = field(default_factory=list)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    # With echo and logprobs: one entry per prompt token (None for the first), set before any event.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def cancel(self) -> None:
        """Stop generating (a client gone, a timeout): the engine frees the rows at its next step."""
        self.cancelled = True

    @property
    def completion_tokens(self) -> int:
        return sum(s.generated for s in self.sequences)


@dataclass
class Prefill:
    """A request whose prompt is going into the cache, chunk by chunk, in the first of its rows."""

    request: Request
    rows: list[int]
    done: int = 0  # prompt tokens in the cache so far


@dataclass
class Completion:
    """What a request produced, for callers without streaming."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # per choice, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Engine:
    def __init__(self, model: GPT, tokenizer, eos_id: int | None, max_batch_size: int = 16,
                 prefill_chunk: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk  # prompt tokens prefilled per step; None: whole prompts
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(model.spec, max_batch_size, param.device, param.dtype)
        self.free = list(range(max_batch_size))
        self.running: dict[int, tuple[Request, Sequence]] = {}  # row -> its sequence
        self.prefilling: deque[Prefill] = deque()  # admitted, prompt not all in the cache yet
        self.waiting: deque[Request] = deque()
        self.inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()  # submissions, from any thread
        self.tokens_generated = 0  # since the engine started, all requests

    # ---------------------------------------------------------------- submitting

    def submit(self, prompt: list[int], sampling: Sampling, on_event: OnEvent) -> Request:
        """Queue a request (from any thread); on_event receives its text as it is generated."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if min(prompt) < 0 or max(prompt) >= self.model.spec.vocab_size:
            raise ValueError(f"the prompt has token ids outside the vocabulary (0 to {self.model.spec.vocab_size - 1})")
        if len(prompt) + sampling.max_tokens > self.model.spec.context_length:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                             f"model's context ({self.model.spec.context_length})")
        if sampling.n > self.max_batch_size:
            raise ValueError(f"n ({sampling.n}) exceeds the engine's batch size ({self.max_batch_size})")
        request = Request(list(prompt), sampling, on_event)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
        for i in range(sampling.n):  # choice i draws from its own generator: seed + i
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed + i)
            request.sequences.append(Sequence(i, generator, TextStream(self.tokenizer, sampling.stop)))
        self.inbox.put(request)
        return request

    def generate(self, prompts: list[list[int]], sampling: Sampling | list[Sampling]) -> list[Completion]:
        """Run requests to the end, stepping in this thread (tests, benchmarks)."""
        settings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        texts: list[list[list[str]]] = [[[] for _ in range(s.n)] for s in settings]
        reasons: list[list[str]] = [[""] * s.n for s in settings]
        logprobs: list[list[list[TokenLogprob]]] = [[[] for _ in range(s.n)] for s in settings]

        def collect(i: int):
            def on_event(choice: int, text: str, finish: str | None, lps: list[TokenLogprob] | None) -> None:
                texts[i][choice].append(text)
                logprobs[i][choice] += lps or []
                if finish:
                    reasons[i][choice] = finish
            return on_event

        requests = [self.submit(p, s, collect(i)) for i, (p, s) in enumerate(zip(prompts, settings))]
        while not all(r.done.is_set() for r in requests):
            self.step()
        return [Completion(["".join(t) for t in texts[i]], reasons[i], len(r.prompt), r.completion_tokens,
                           logprobs[i] if r.sampling.logprobs is not None else [], r.prompt_logprobs)
                for i, r in enumerate(requests)]

    # ---------------------------------------------------------------- the loop

    @property
    def busy(self) -> bool:
        """Whether a step has work: running rows, waiting requests or new submissions."""
        return bool(self.running or self.prefilling or self.waiting or not self.inbox.empty())

    def fail_all(self) -> None:
        """End every running, prefilling and waiting request with finish reason "error" (after a failed step)."""
        requests = ({id(r): r for r, _ in self.running.values()} | {id(p.request): p.request for p in self.prefilling}
                    | {id(r): r for r in self.waiting})
        self.waiting.clear()
        for request in requests.values():
            self._fail(request)

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free rows, decode one token in every running row, then
        prefill admitted prompts (at most prefill_chunk tokens of them)."""
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for row, (request, _) in list(self.running.items()):
            if request.cancelled:
                self._release(row)
        for prefill in [p for p in self.prefilling if p.request.cancelled]:
            self._fail(prefill.request, notify=False)
        while self.waiting and (self.waiting[0].cancelled or len(self.free) >= self.waiting[0].sampling.n):
            request = self.waiting.popleft()
            if request.cancelled:
                request.done.set()
            else:
                self._admit(request)
        if self.running:
            self._decode()
        budget = self.prefill_chunk or sum(len(p.request.prompt) for p in self.prefilling)  # None: every prompt whole
        while self.prefilling and budget > 0:
            budget -= self._prefill(self.prefilling[0], budget)

    def _decode(self) -> None:
        """One token in every running row, in one forward pass."""
        rows = sorted(self.running)
        inputs = torch.tensor([[self.running[r][1].last] for r in rows], device=self.device)
        every = len(rows) == self.max_batch_size  # all rows, in order: the cache is read without a gather
        logits, _ = self.model(inputs, cache=self.cache, rows=None if every else torch.tensor(rows, device=self.device))
        for i, row in enumerate(rows):
            self._accept(row, logits[i, -1])

    def _admit(self, request: Request) -> None:
        """Reserve a row per choice; the prompt goes into the first row's cache in _prefill."""
        rows = [self.free.pop(0) for _ in request.sequences]
        for row in rows:
            self.cache.lengths[row] = 0
        if request.sampling.echo and request.sampling.logprobs is not None:
            request.prompt_logprobs = [None]  # the first prompt token has no context to be predicted from
        self.prefilling.append(Prefill(request, rows))

    def _prefill(self, prefill: Prefill, budget: int) -> int:
        """The next chunk of a prompt (at most budget tokens) into its first row; once the whole
        prompt is in, the request's other choices copy that row and every choice samples its first
        token (all running before any samples, so one that ends at once does not end the request).
        Returns the tokens prefilled."""
        request, rows = prefill.request, prefill.rows
        chunk = request.prompt[prefill.done:prefill.done + budget]
        try:
            logits, _ = self.model(torch.tensor([chunk], device=self.device), cache=self.cache,
                                   rows=torch.tensor(rows[:1], device=self.device),
                                   last_only=request.prompt_logprobs is None)  # echo's logprobs need them all
        except Exception:  # e.g. out of memory for a long prompt: this request fails, not the batch
            traceback.print_exc()
            self._fail(request)
            return len(chunk)
        prefill.done += len(chunk)
        complete = prefill.done == len(request.prompt)
        if request.prompt_logprobs is not None:  # positions predicting the prompt's next tokens
            targets = request.prompt[prefill.done - len(chunk) + 1:prefill.done + 1]
            request.prompt_logprobs += token_logprobs(logits[0, :len(targets)],
                                                      torch.tensor(targets), request.sampling.logprobs)
        if not complete:
            return len(chunk)
        self.prefilling.remove(prefill)
        for row in rows[1:]:
            self.cache.copy_row(rows[0], row)
        for row, sequence in zip(rows, request.sequences):
            self.running[row] = (request, sequence)
        for row in rows:
            if request.sampling.max_tokens == 0:  # the prompt alone (scoring it with echo and logprobs)
                self._finish(row, "", "length")
            else:
                self._accept(row, logits[0, -1])
        return len(chunk)

    def _accept(self, row: int, logits: torch.Tensor) -> None:
        """Sample the row's next token from logits (V,) and hand out the text it completes."""
        if row not in self.running:  # its request failed meanwhile
            return
        request, sequence = self.running[row]
        s = request.sampling
        try:
            token = sample(logits, s.temperature, s.top_k, s.top_p, sequence.generator)
        except Exception:  # this request's settings cannot sample these logits: it fails alone
            traceback.print_exc()
            self._fail(request)
            return
        sequence.generated += 1
        self.tokens_generated += 1
        sequence.last = token
        if s.logprobs is not None:
            sequence.logprobs += token_logprobs(logits[None], torch.tensor([token]), s.logprobs)
        finish = None
        if token == self.eos_id:
            text, finish = sequence.stream.flush(), "stop"
        else:
            text = sequence.stream.add(token)
            if sequence.stream.stopped:
                finish = "stop"
            elif sequence.generated >= s.max_tokens:
                text, finish = text + sequence.stream.flush(), "length"
        if text or finish:
            self._finish(row, text, finish)

    def _finish(self, row: int, text: str, finish: str | None) -> None:
        """Hand out a row's new text (and the log-probabilities gathered since the last event);
        free the row when finish is set."""
        request, sequence = self.running[row]
        logprobs = None
        if request.sampling.logprobs is not None:
            logprobs, sequence.logprobs = sequence.logprobs, []
        try:
            request.on_event(sequence.index, text, finish, logprobs)
        except Exception:  # the caller is gone (its event loop closed): stop generating for it
            request.cancel()
        if finish:
            self._release(row)

    def _fail(self, request: Request, notify: bool = True) -> None:
        """End one request with finish reason "error" (told to its caller unless cancelled) and free its rows."""
        for row in [r for r, (req, _) in self.running.items() if req is request]:
            self._release(row)
        for prefill in [p for p in self.prefilling if p.request is request]:
            self.prefilling.remove(prefill)
            self.free += prefill.rows
        for sequence in request.sequences if notify else ():
            try:
                request.on_event(sequence.index, "", "error", None)
            except Exception:
                pass
        request.done.set()

    def _release(self, row: int) -> None:
        request, _ = self.running.pop(row)
        self.free.append(row)
        if not any(r is request for r, _ in self.running.values()):
            request.done.set()


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
           generator: torch.Generator) -> int:
    """One token id from logits (V,): the argmax at temperature 0, else a draw from the filtered softmax."""
    scaled = logits.float()[None] / temperature if temperature > 0 else None
    if scaled is None or not bool(torch.isfinite(scaled).all()):  # a tiny temperature overflows: greedy anyway
        return int(logits.argmax())
    return int(torch.multinomial(filter_logits(scaled, top_k, top_p).softmax(dim=-1), 1, generator=generator))
