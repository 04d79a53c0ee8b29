"""The built-in generator: many requests at once over one KV cache, with continuous batching.

Plain PyTorch and the tokenizer; Ray Serve wraps it from the outside (``serve.app``).

Each choice of a request (a *sequence*) owns one row of a preallocated KV cache. At every
decoding step the engine admits waiting requests into free rows (one prefill pass over the
prompt, copied to the rows of the request's other choices), then runs one forward pass over
all running rows, each at its own position (``KVCache`` keeps a length per row), and samples
one token per row with that sequence's own settings and random generator. A sequence leaves
at end-of-text, at a stop string or at ``max_tokens``, and its row is free for the next
request at the following step: requests join and leave the batch at every step.

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


# on_event(choice index, new text, finish reason or None): called from step(), in the thread that steps.
OnEvent = Callable[[int, str, "str | None"], None]


@dataclass
class Sequence:
    index: int  # the choice's index within its request
    generator: torch.Generator
    stream: TextStream
    last: int = 0  # the latest token, the next step's input
    generated: int = 0


@dataclass
class Request:
    prompt: list[int]
    sampling: Sampling
    on_event: OnEvent
    sequences: list[Sequence] = field(default_factory=list)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (a client gone, a timeout): the engine frees the rows at its next step."""
        self.cancelled = True

    @property
    def completion_tokens(self) -> int:
        return sum(s.generated for s in self.sequences)


@dataclass
class Completion:
    """What a request produced, for callers without streaming."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int


class Engine:
    def __init__(self, model: GPT, tokenizer, eos_id: int | None, max_batch_size: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.max_batch_size = max_batch_size
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(model.spec, max_batch_size, param.device, param.dtype)
        self.free = list(range(max_batch_size))
        self.running: dict[int, tuple[Request, Sequence]] = {}  # row -> its sequence
        self.waiting: deque[Request] = deque()
        self.inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()  # submissions, from any thread
        self.tokens_generated = 0  # since the engine started, all requests

    # ---------------------------------------------------------------- submitting

    def submit(self, prompt: list[int], sampling: Sampling, on_event: OnEvent) -> Request:
        """Queue a request (from any thread); on_event receives its text as it is generated."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
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

        def collect(i: int):
            def on_event(choice: int, text: str, finish: str | None) -> None:
                texts[i][choice].append(text)
                if finish:
                    reasons[i][choice] = finish
            return on_event

        requests = [self.submit(p, s, collect(i)) for i, (p, s) in enumerate(zip(prompts, settings))]
        while not all(r.done.is_set() for r in requests):
            self.step()
        return [Completion(["".join(t) for t in texts[i]], reasons[i], len(r.prompt), r.completion_tokens)
                for i, r in enumerate(requests)]

    # ---------------------------------------------------------------- the loop

    @property
    def busy(self) -> bool:
        """Whether a step has work: running rows, waiting requests or new submissions."""
        return bool(self.running or self.waiting or not self.inbox.empty())

    def fail_all(self) -> None:
        """End every running and waiting request with finish reason "error" (after a failed step)."""
        requests = {id(r): r for r, _ in self.running.values()} | {id(r): r for r in self.waiting}
        self.waiting.clear()
        for request in requests.values():
            self._fail(request)

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free rows, then decode one token in every running row."""
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for row, (request, _) in list(self.running.items()):
            if request.cancelled:
                self._release(row)
        while self.waiting and (self.waiting[0].cancelled or len(self.free) >= self.waiting[0].sampling.n):
            request = self.waiting.popleft()
            if request.cancelled:
                request.done.set()
            else:
                self._admit(request)
        if not self.running:
            return
        rows = sorted(self.running)
        inputs = torch.tensor([[self.running[r][1].last] for r in rows], device=self.device)
        every = len(rows) == self.max_batch_size  # all rows, in order: the cache is read without a gather
        logits, _ = self.model(inputs, cache=self.cache, rows=None if every else torch.tensor(rows, device=self.device))
        for i, row in enumerate(rows):
            self._accept(row, logits[i, -1])

    def _admit(self, request: Request) -> None:
        """Prefill the prompt once, in the first row; the request's other choices copy that row.
        Every choice is running before any samples, so one that ends at once does not end the request."""
        rows = [self.free.pop(0) for _ in request.sequences]
        for row, sequence in zip(rows, request.sequences):
            self.cache.lengths[row] = 0
            self.running[row] = (request, sequence)
        try:
            logits, _ = self.model(torch.tensor([request.prompt], device=self.device), cache=self.cache,
                                   rows=torch.tensor(rows[:1], device=self.device))
        except Exception:  # e.g. out of memory for a long prompt: this request fails, not the batch
            traceback.print_exc()
            self._fail(request)
            return
        for row in rows[1:]:
            self.cache.copy_row(rows[0], row)
        for row in rows:
            self._accept(row, logits[0, -1])

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
            try:
                request.on_event(sequence.index, text, finish)
            except Exception:  # the caller is gone (its event loop closed): stop generating for it
                request.cancel()
        if finish:
            self._release(row)

    def _fail(self, request: Request) -> None:
        """End one request with finish reason "error" and free its rows."""
        for row in [r for r, (req, _) in self.running.items() if req is request]:
            self._release(row)
        for sequence in request.sequences:
            try:
                request.on_event(sequence.index, "", "error")
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
