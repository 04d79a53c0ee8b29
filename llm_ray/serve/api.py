"""The OpenAI completions API: request validation and response bodies, without any server.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and always
name the field: the server answers 4xx with them, never 500.
"""

from __future__ import annotations

import json
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class CompletionRequest(BaseModel):
    """POST /v1/completions. Fields OpenAI has and llm-ray does not (logprobs, echo, best_of,
    penalties, suffix, logit_bias) are refused by name rather than ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str | None = None
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**62)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


async def read_body(chunks, limit: int) -> bytes:
    """The body from an async iterator of chunks, refused with 413 as soon as it passes limit
    (a huge body is never held whole)."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body has more than {limit} bytes, this server's limit")
    return bytes(body)


def parse_request(body: bytes, limits: LimitsConfig) -> CompletionRequest:
    """The request from its raw body (read_body caps its size); APIError (400 or 422) naming what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = CompletionRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        problem = "unknown or unsupported field" if first["type"] == "extra_forbidden" else first["msg"]
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise APIError(422, f"{field}: {problem}{more}" if field else f"{problem}{more}", field) from None
    prompts = request.prompt if isinstance(request.prompt, list) else [request.prompt]
    stops = stop_strings(request)
    for value, cap, field in ((request.max_tokens, limits.max_tokens, "max_tokens"), (request.n, limits.max_n, "n"),
                              (len(prompts), limits.max_prompts, "prompt"), (len(stops), limits.max_stop, "stop")):
        if value is not None and value > cap:
            raise APIError(400, f"{field}: {value} is over this server's limit of {cap}", field)
    if any(not s for s in stops):
        raise APIError(400, "stop: an empty stop string would end every completion at once", "stop")
    for field, texts in (("prompt", prompts), ("stop", stops)):
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(400, f"{field}: not valid Unicode text ({e.reason} at character {e.start})",
                               field) from None
    return request


def stop_strings(request: CompletionRequest) -> list[str]:
    return request.stop if isinstance(request.stop, list) else [request.stop] if request.stop else []


def sampling(request: CompletionRequest, limits: LimitsConfig) -> Sampling:
    return Sampling(max_tokens=request.max_tokens or limits.default_max_tokens, temperature=request.temperature,
                    top_p=request.top_p, top_k=request.top_k, stop=tuple(stop_strings(request)), seed=request.seed,
                    n=request.n)


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    over = prompt_tokens + max_tokens - context
    if over > 0:
        raise APIError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                            f"context of {context} tokens by {over}: shorten the prompt or lower max_tokens",
                       "max_tokens")


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


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
