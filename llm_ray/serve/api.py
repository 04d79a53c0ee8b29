"""The OpenAI completions API: request validation and response bodies, without any server.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and always
name the field: the server answers 4xx with them, never 500.

What lm-eval-harness's ``local-completions`` sends is served: token-id prompts (one list of
ids, or a list of them), ``echo`` and ``logprobs`` in OpenAI's legacy layout, ``max_tokens: 0``.
"""

from __future__ import annotations

import json
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from llm_ray.config.serve import LimitsConfig
from llm_ray.serve.engine import Sampling


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = {408: "timeout_error", 413: "invalid_request_error", 503: "overloaded_error"}.get(
            self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The settings completions and chat share. Unknown fields are refused by name, not ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**62)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(GenerationRequest):
    """POST /v1/completions. Fields OpenAI has and llm-ray does not (best_of, penalties, suffix,
    logit_bias) are refused by name rather than ignored."""

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): a text's token ids."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's): token ids' text."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[StrictInt]


async def read_body(chunks, limit: int) -> bytes:
    """The body from an async iterator of chunks, refused with 413 as soon as it passes limit
    (a huge body is never held whole)."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body has more than {limit} bytes, this server's limit")
    return bytes(body)


def validate(model: type[BaseModel], body: bytes) -> BaseModel:
    """A request model from a raw body (read_body caps its size); APIError (400 or 422) naming the field."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        problem = "unknown or unsupported field" if first["type"] == "extra_forbidden" else first["msg"]
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise APIError(422, f"{field}: {problem}{more}" if field else f"{problem}{more}", field) from None


def parse_request(body: bytes, limits: LimitsConfig) -> CompletionRequest:
    """The request from its raw body; APIError (400 or 422) naming what is wrong."""
    request = validate(CompletionRequest, body)
    prompts = request.prompts()
    if not prompts or any(len(p) == 0 and not isinstance(p, str) for p in prompts):
        raise APIError(400, "prompt: a list of prompts or of token ids must not be empty", "prompt")
    check_limits(request, len(prompts), limits)
    check_text("prompt", [p for p in prompts if isinstance(p, str)])
    return request


def check_limits(request, prompts: int, limits: LimitsConfig, logprobs: int | None = None) -> None:
    """The limits every request type shares: max_tokens, n, prompts, stop strings, logprobs."""
    logprobs = request.logprobs if logprobs is None else logprobs
    stops = stop_strings(request)
    for value, cap, field in ((request.max_tokens, limits.max_tokens, "max_tokens"), (request.n, limits.max_n, "n"),
                              (prompts, limits.max_prompts, "prompt"), (len(stops), limits.max_stop, "stop"),
                              (logprobs, limits.max_logprobs, "logprobs")):
        if value is not None and value > cap:
            raise APIError(400, f"{field}: {value} is over this server's limit of {cap}", field)
    if any(not s for s in stops):
        raise APIError(400, "stop: an empty stop string would end every completion at once", "stop")
    check_text("stop", stops)


def check_text(field: str, texts: list[str]) -> None:
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{field}: not valid Unicode text ({e.reason} at character {e.start})",
                           field) from None


def check_token_ids(ids: list[int], vocab_size: int, field: str = "prompt") -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise APIError(400, f"{field}: token id {bad[0]} is outside the vocabulary (0 to {vocab_size - 1})", field)


def stop_strings(request: CompletionRequest) -> list[str]:
    return request.stop if isinstance(request.stop, list) else [request.stop] if request.stop else []


def sampling(request: CompletionRequest, limits: LimitsConfig) -> Sampling:
    max_tokens = limits.default_max_tokens if request.max_tokens is None else request.max_tokens
    return Sampling(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                    stop=tuple(stop_strings(request)), seed=request.seed, n=request.n, logprobs=request.logprobs,
                    echo=request.echo)


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    over = prompt_tokens + max_tokens - context
    if over > 0:
        raise APIError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                            f"context of {context} tokens by {over}: shorten the prompt or lower max_tokens",
                       "max_tokens")


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(cid: str, model: str, choices: list[dict], usage: dict | None) -> dict:
    body = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
