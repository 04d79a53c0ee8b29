"""The Ray Serve app: the built-in generator behind an OpenAI-compatible HTTP API.

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (JSON, or server-sent events
with ``stream``), ``GET /v1/models`` (with the model's provenance), ``GET /health``, the
playground page at ``/``, and vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``
(lm-eval's ``local-completions`` tokenizes through them, so it needs no copy of the tokenizer).
Overload is Serve's job: past ``max_ongoing_requests`` per replica requests queue, past
``max_queued_requests`` they get 503 at once. The replica's own deadline gives 408.
The engine steps in a thread of its own; each step's events reach the handlers on the event loop.

``build_app(args)`` is the application builder for ``serve run`` / ``serve deploy`` config
files (``args`` are a ServeConfig's fields); ``llm-ray serve`` calls it too.
"""


import asyncio
import os
import time
import traceback
import threading
from importlib import resources
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from llm_ray.checkpoint import WEIGHTS, find_model_dir, load_model, read_config, tied_names
from llm_ray.checkpoint.best import read_state
from llm_ray.checkpoint.provenance import provenance
from llm_ray.config import ConfigError, model_spec
from llm_ray.config.loading import format_validation_error
from llm_ray.config.serve import ServeConfig
from llm_ray.data.tokenizer import EOT, PAD, eot_id
from llm_ray.model import GPT
from llm_ray.serve import api, chat
from llm_ray.serve.engine import Engine
from llm_ray.serve.logprobs import TokenTexts
from llm_ray.serve.responses import Chat, Completions
from llm_ray.serve.options import deployment_options
from llm_ray.serve.vllm import build_vllm_app

http = FastAPI(title="llm-ray", docs_url=None, redoc_url=None)


class Deadline(Exception):
    pass


@serve.deployment
@serve.ingress(http)
class CompletionServer:
    def __init__(self, config: dict):
        self.cfg = cfg = ServeConfig.model_validate(config)
        if cfg.ingress == "direct" and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
            raise ConfigError("ingress: direct, but this Ray's Serve has no direct ingress (a cluster needs "
                              "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 from its start): set ingress to auto or proxy")
        self.threads = cfg.torch_threads or max(1, int(-(-cfg.cpus_per_replica // 1)))
        torch.set_num_threads(self.threads)
        model_dir = find_model_dir(cfg.checkpoint).resolve()
        device = "cuda" if cfg.gpus_per_replica > 0 else "cpu"
        model, self.tokenizer, train_cfg = load_model(model_dir, device=device)
        self.eos = eot_id(self.tokenizer)
        self.context = model.spec.context_length
        self.model_id = cfg.model_id or train_cfg.name
        self.card = {"id": self.model_id, "object": "model", "created": int(model_dir.stat().st_mtime),
                     "owned_by": "llm-ray", "engine": "builtin",
                     "provenance": provenance(model_dir, train_cfg, read_state(model_dir),
                                              model.num_params(non_embedding=False))}
        self.vocab_size = model.spec.vocab_size
        self.texts = TokenTexts(self.tokenizer)
        source, self.plain_template = chat.find_template(model_dir, cfg.chat_template)
        self.template = chat.ChatTemplate(source, EOT)
        self.engine = Engine(model, self.tokenizer, self.eos, cfg.max_batch_size, cfg.prefill_chunk_tokens)
        self.outbox: list[tuple[asyncio.Queue, tuple]] = []  # events of the running step, for the handlers
        self.wake = threading.Event()  # set by each submission
        self.loop: asyncio.AbstractEventLoop | None = None  # the handlers' loop, known at the first request
        self.engine_threads: int | None = None  # torch threads in the engine's thread
        threading.Thread(target=self.run_engine, name="llm-ray-engine", daemon=True).start()

    def run_engine(self) -> None:
        """The engine's thread: steps while there is work, and after each step hands its events to
        the event loop in one call (the loop stays free to take requests and stream meanwhile)."""
        torch.set_num_threads(self.threads)  # OpenMP's thread count is per thread: set it where the model runs
        self.engine_threads = torch.get_num_threads()
        while True:
            self.wake.wait()
            self.wake.clear()
            while self.engine.busy:
                try:
                    self.engine.step()
                except Exception:  # a failed step ends its requests with an error, not a hang
                    traceback.print_exc()
                    self.engine.fail_all()
                events, self.outbox = self.outbox, []
                if events:
                    self.loop.call_soon_threadsafe(self.deliver, events)

    @staticmethod
    def deliver(events: list[tuple[asyncio.Queue, tuple]]) -> None:
        """On the event loop: a step's events into their requests' queues."""
        for queue, event in events:
            queue.put_nowait(event)

    # ------------------------------------------------------------------ routes

    @http.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_id, "replica": serve.get_replica_context().replica_id.unique_id,
                "pid": os.getpid(),
                "running": len(self.engine.running), "waiting": len(self.engine.waiting),
                "torch_threads": self.engine_threads, "tokens_generated": self.engine.tokens_generated,
                "ingress": "direct" if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1" else "proxy"}

    @http.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self.card]}

    @http.get("/", response_class=HTMLResponse)
    async def playground(self) -> str:
        return resources.files("llm_ray.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @http.post("/v1/completions")
    async def completions(self, request: Request):
        started = time.monotonic()
        try:
            req = api.parse_request(await self.read(request), self.cfg.limits)
            self.check_model(req.model)
            sampling = api.sampling(req, self.cfg.limits)
            given = req.prompts()
            prompts = [self.token_ids(p, "prompt" if len(given) == 1 else f"prompt[{i}]") for i, p in enumerate(given)]
            self.check_context(prompts, sampling)
        except api.APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        events, submitted = self.submit(prompts, sampling)
        texts = [p if isinstance(p, str) else self.tokenizer.decode(p, skip_special_tokens=True) for p in given]
        shape = Completions(api.completion_id(), self.model_id, self.texts, req, texts, prompts, submitted)
        return await self.respond(shape, events, submitted, len(prompts) * req.n, started, req)

    @http.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        started = time.monotonic()
        try:
            req = chat.parse_chat(await self.read(request), self.cfg.limits)
            self.check_model(req.model)
            sampling = chat.sampling(req, self.cfg.limits, self.plain_template)
            prompts = [self.encode(self.template.render(req.messages))]
            self.check_context(prompts, sampling)
        except api.APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        events, submitted = self.submit(prompts, sampling)
        shape = Chat(chat.chat_id(), self.model_id, self.texts, req)
        return await self.respond(shape, events, submitted, req.n, started, req)

    # vLLM's tokenizer routes: lm-eval's local-completions tokenizes through them when present.

    @http.post("/tokenize")
    async def tokenize(self, request: Request):
        try:
            req = api.validate(api.TokenizeRequest, await self.read(request))
            self.check_model(req.model)
            api.check_text("prompt", [req.prompt])
        except api.APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens).ids
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids}

    @http.post("/detokenize")
    async def detokenize(self, request: Request):
        try:
            req = api.validate(api.DetokenizeRequest, await self.read(request))
            self.check_model(req.model)
            api.check_token_ids(req.tokens, self.vocab_size, "tokens")
        except api.APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @http.get("/tokenizer_info")
    async def tokenizer_info(self) -> dict:
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": None,
                "pad_token": PAD if self.tokenizer.token_to_id(PAD) is not None else None,
                "chat_template": self.template.source, "model_max_length": self.context,
                "vocab_size": self.vocab_size}

    # ------------------------------------------------------------------ helpers

    async def read(self, request: Request) -> bytes:
        return await api.read_body(request.stream(), self.cfg.limits.max_body_bytes)

    def check_model(self, model: str | None) -> None:
        if model not in (None, self.model_id):
            raise api.APIError(404, f"model: {model!r} is not served here; this server has {self.model_id!r}",
                               "model")

    def check_context(self, prompts: list[list[int]], sampling) -> None:
        for ids in prompts:
            api.check_context(len(ids), sampling.max_tokens, self.context)

    def token_ids(self, prompt: str | list[int], field: str) -> list[int]:
        """A prompt's token ids: given, checked against the vocabulary, or encoded from its text."""
        if isinstance(prompt, str):
            return self.encode(prompt)
        api.check_token_ids(prompt, self.vocab_size, field)
        return prompt

    def submit(self, prompts: list[list[int]], sampling) -> tuple[asyncio.Queue, list]:
        """Queue every prompt in the engine; its events arrive in the returned queue as (choice
        index, text, finish reason, log-probabilities), the index being prompt index * n + choice
        (OpenAI's order)."""
        self.loop = self.loop or asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        submitted = []
        for p, ids in enumerate(prompts):
            def on_event(i, text, finish, logprobs, base=p * sampling.n):  # in the engine's thread, during a step
                self.outbox.append((events, (base + i, text, finish, logprobs)))
            submitted.append(self.engine.submit(ids, sampling, on_event))
        self.wake.set()
        return events, submitted

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt; an empty prompt starts a new document."""
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids or [self.eos]

    def usage(self, submitted) -> dict:
        """Token counts: each prompt once (however many choices), every generated token."""
        return api.usage(sum(len(r.prompt) for r in submitted), sum(r.completion_tokens for r in submitted))

    def timeout(self) -> api.APIError:
        return api.APIError(408, f"the request took longer than this server's limit of "
                                 f"{self.cfg.request_timeout_s:g} s (request_timeout_s)")

    async def respond(self, shape, events: asyncio.Queue, submitted: list, total: int, started: float, req):
        """The whole response, or a stream of server-sent events when the request asks for one."""
        deadline = started + self.cfg.request_timeout_s
        if req.stream:
            return StreamingResponse(self.stream(shape, events, submitted, total, deadline, req),
                                     media_type="text/event-stream")
        pieces: list[list[dict]] = [[] for _ in range(total)]
        try:
            async for index, text, finish, logprobs in self.collect(events, total, deadline):
                pieces[index].append(shape.piece(index, text, finish, logprobs, first=not pieces[index]))
        except Deadline:
            return JSONResponse(self.timeout().body(), status_code=408)
        finally:
            for r in submitted:
                r.cancel()  # no-op for finished requests; frees the rows of abandoned ones
        if any(p[-1]["finish_reason"] == "error" for p in pieces):  # the engine's step failed: logged by the replica
            return JSONResponse(api.APIError(500, "generation failed on the replica (see its log)").body(),
                                status_code=500)
        return shape.body([shape.merge(i, p) for i, p in enumerate(pieces)], self.usage(submitted))

    async def collect(self, events: asyncio.Queue, total: int, deadline: float):
        """(choice index, text, finish reason, log-probabilities) as the engine produces them, until
        every choice finished."""
        finished = 0
        while finished < total:
            try:
                event = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise Deadline from None
            finished += event[2] is not None
            yield event

    async def stream(self, shape, events: asyncio.Queue, submitted, total: int, deadline: float, req):
        """Server-sent events, one per piece of text. The first goes out at once; after it, what is
        ready goes out together at most every stream_interval_ms (fewer chunks through the proxy)."""
        interval, flush_at, pending, started = self.cfg.stream_interval_ms / 1000, 0.0, [], set()
        try:
            async for index, text, finish, logprobs in self.collect(events, total, deadline):
                pending.append(api.sse(shape.chunk([shape.piece(index, text, finish, logprobs,
                                                                first=index not in started)])))
                started.add(index)
                if finish == "error":  # the engine failed this request: say so, as for a timeout
                    pending.append(api.sse(api.APIError(500, "generation failed on the replica (see its log)").body()))
                if events.empty() and time.monotonic() >= flush_at:
                    yield "".join(pending)
                    pending, flush_at = [], time.monotonic() + interval
            if req.stream_options and req.stream_options.include_usage:
                pending.append(api.sse(shape.chunk([], self.usage(submitted))))
        except Deadline:
            pending.append(api.sse(self.timeout().body()))
        finally:  # also when the client went away (the generator is closed)
            for r in submitted:
                r.cancel()
        yield "".join(pending) + api.sse("[DONE]")


def build_app(args: dict):
    """Application builder: `serve run llm_ray.serve.app:build_app checkpoint=/abs/path` or a config file."""
    from pydantic import ValidationError

    try:
        cfg = ServeConfig.model_validate(args)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, ServeConfig)) from None
    if cfg.engine == "vllm":
        return build_vllm_app(cfg)
    if cfg.checkpoint is None:
        raise ConfigError("checkpoint: set it to a checkpoint folder (absolute path: replicas run in Ray's own "
                          "working folders)")
    try:
        model_dir = find_model_dir(cfg.checkpoint)
    except FileNotFoundError as e:
        given = Path(cfg.checkpoint).expanduser()
        pickles = sorted(p.name for p in given.glob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"))
        note = (f"; {', '.join(pickles)} are pickle files, which llm-ray never loads (unpickling runs code): "
                "serve a checkpoint's model/ folder or an export with safetensors") if pickles else ""
        raise ConfigError(f"checkpoint: {e}{note}") from None
    check_checkpoint(model_dir)
    template, _ = chat.find_template(model_dir, cfg.chat_template)  # replicas get the template itself, not its file
    cfg = cfg.model_copy(update={"checkpoint": str(Path(model_dir).resolve()),
                                 "chat_template": template if cfg.chat_template is not None else None})
    return CompletionServer.options(**deployment_options(cfg)).bind(cfg.model_dump(mode="json"))


def check_checkpoint(model_dir: Path) -> None:
    """The checkpoint's files are readable and fit together, before any replica tries: its config,
    the tokenizer, and the safetensors header against the model the config describes (built on
    the meta device: no tensor is loaded). ConfigError naming the file otherwise."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    def shapes(path):
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    read = {}
    for name, reader in (("config.yaml", lambda p: read_config(p.parent)),
                         ("tokenizer.json", lambda p: Tokenizer.from_file(str(p))),
                         (WEIGHTS, shapes)):
        try:
            read[name] = reader(model_dir / name)
        except Exception as e:  # yaml, pydantic, safetensors and tokenizers each raise their own types
            raise ConfigError(f"checkpoint: {model_dir / name} is missing or unreadable: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    spec = model_spec(read["config.yaml"])
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(spec).state_dict().items() if k not in tied_names(spec)}
    if read[WEIGHTS] != expected:
        wrong = sorted(k for k in expected.keys() | read[WEIGHTS].keys() if expected.get(k) != read[WEIGHTS].get(k))
        raise ConfigError(f"checkpoint: {model_dir / WEIGHTS} does not fit the model in its config.yaml: "
                          f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''} differ")
