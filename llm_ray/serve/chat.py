"""The OpenAI chat API: messages rendered to a prompt through a chat template, and chat bodies.

The template is the checkpoint's own when it has one (``chat_template`` in a
``tokenizer_config.json`` beside ``tokenizer.json``, Hugging Face's convention), the serve
config's ``chat_template`` when set, else the plain template below. Templates render in Jinja's
sandbox, with Hugging Face's variables: ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token`` and ``raise_exception``.

The plain template writes a ``role: content`` line per message and ends with ``assistant:``;
the reply ends at end-of-text or where the model starts a ``user:`` line of its own.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from llm_ray.config import ConfigError
from llm_ray.config.serve import LimitsConfig
from llm_ray.serve import api
from llm_ray.serve.engine import Sampling

PLAIN_TEMPLATE = ("{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")
PLAIN_STOP = "\nuser:"  # the plain template's end of a reply


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(api.GenerationRequest):
    """POST /v1/chat/completions. Tools, response formats, penalties and logit_bias are refused by name."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                             f"({self.max_completion_tokens}) differ: give one")
        self.max_tokens = self.max_tokens or self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


def parse_chat(body: bytes, limits: LimitsConfig) -> ChatRequest:
    request = api.validate(ChatRequest, body)
    api.check_limits(request, 1, limits, logprobs=request.top_logprobs or 0)
    api.check_text("messages", [m.text() for m in request.messages])
    return request


def sampling(request: ChatRequest, limits: LimitsConfig, plain: bool) -> Sampling:
    stops = tuple(api.stop_strings(request)) + ((PLAIN_STOP,) if plain else ())
    return Sampling(max_tokens=request.max_tokens or limits.default_max_tokens, temperature=request.temperature,
                    top_p=request.top_p, top_k=request.top_k, stop=stops, seed=request.seed, n=request.n,
                    logprobs=(request.top_logprobs or 0) if request.logprobs else None)


def find_template(model_dir: Path, configured: str | None) -> tuple[str, bool]:
    """(the template, whether it is the plain one): the configured one (the template itself, or a
    file holding it), else the checkpoint's tokenizer_config.json's, else the plain template.
    ConfigError naming chat_template for a file that is not there or a template that does not compile."""
    if configured is not None:
        template = configured
        if "{" not in configured:
            path = Path(configured).expanduser()
            if not path.is_file():
                raise ConfigError(f"chat_template: {path} is not a file (give a Jinja template, or a file holding one)")
            template = path.read_text(encoding="utf-8")
        try:
            ChatTemplate(template, "")
        except Exception as e:  # jinja2's TemplateSyntaxError
            raise ConfigError(f"chat_template: not a valid Jinja template: {e}") from None
        return template, False
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str) and template:
            return template, False
    return PLAIN_TEMPLATE, True


class ChatTemplate:
    """A compiled template; render() gives the prompt text, APIError (400) when the template refuses the messages."""

    def __init__(self, source: str, eos_token: str):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.source = source
        self.template = env.from_string(source)
        self.tokens = {"eos_token": eos_token, "bos_token": ""}  # llm-ray's tokenizers have no BOS token

    def render(self, messages: list[Message]) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=[{"role": m.role, "content": m.text()} for m in messages],
                                        add_generation_prompt=True, **self.tokens)
        except TemplateError as e:
            raise api.APIError(400, f"messages: the chat template refuses them: {e}", "messages") from None


def chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chunk_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None,
                 first: bool = False) -> dict:
    delta = ({"role": "assistant"} if first else {}) | {"content": text}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(cid: str, model: str, choices: list[dict], usage: dict | None, chunk: bool = False) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body
