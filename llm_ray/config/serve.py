"""Serving settings: `llm-ray serve`, and the Ray Serve config files in jobs/."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from llm_ray.config.base import ConfigError, Section
from llm_ray.config.loading import apply_override, format_validation_error, read_yaml


class AutoscalingConfig(Section):
    """Ray Serve adds replicas while each has more than target_ongoing_requests in flight."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 scales to zero when idle).")
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Requests in flight per replica to aim for.")

    @model_validator(mode="after")
    def _order(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class LimitsConfig(Section):
    """What one request may ask for; beyond it the request gets a 4xx that says which limit."""

    max_tokens: int = Field(512, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request leaves it out (OpenAI's 16).")
    max_n: int = Field(4, ge=1, description="Most choices (n) per prompt.")
    max_prompts: int = Field(8, ge=1, description="Most prompts in one request (prompt as a list).")
    max_stop: int = Field(4, ge=0, description="Most stop strings per request (OpenAI's 4).")
    max_body_bytes: int = Field(65536, ge=1024, description="Largest request body; larger gets 413.")
    max_logprobs: int = Field(20, ge=0, description="Most alternatives a request may ask for per token (logprobs, "
                              "top_logprobs).")


class VLLMConfig(Section):
    """engine: vllm: Ray Serve LLM (vLLM) on GPUs, from a Hugging Face export (`llm-ray export`)."""

    accelerator_type: str | None = Field(None, description="GPU type for the replicas, e.g. A10G, L4, H100 (null: "
                                         "any).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica that split each layer.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    engine_kwargs: dict = Field(default_factory=dict, description="More vLLM engine arguments, passed as given.")


class ServeConfig(Section):
    checkpoint: str | None = Field(None, description="Checkpoint folder (or its model/) for the builtin engine; a "
                                   "Hugging Face export folder or s3:// URI for vllm. `llm-ray serve` sets it from "
                                   "--checkpoint, --run or --sweep.")
    engine: Literal["builtin", "vllm"] = Field("builtin", description="builtin: llm-ray's generator (CPU or one "
                                               "GPU per replica); vllm: Ray Serve LLM with vLLM (GPU clusters).")
    model_id: str | None = Field(None, description="The model's name in the API (null: the training run's name).")
    host: str = Field("127.0.0.1", description="Address the HTTP server binds; 127.0.0.1 keeps it to this "
                      "machine. Anything else exposes it to the network: put authentication in front. (Under "
                      "`serve run` / `serve deploy`, the file's http_options apply instead.)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port (under `serve run` / `serve deploy`: the file's "
                      "http_options).")
    ingress: Literal["auto", "direct", "proxy"] = Field(
        "auto", description="direct: the replica answers HTTP on port itself (Ray Serve's direct ingress), one "
        "hop less than through Serve's proxy (benchmarks/serve_load.py); one replica, on a Ray that `llm-ray serve` "
        "starts. proxy: Serve's proxy on port routes to the replicas (several, autoscaling, a joined cluster). auto: "
        "direct where it can be, else proxy. (Under `serve run` / `serve deploy`, the cluster's "
        "RAY_SERVE_ENABLE_DIRECT_INGRESS decides.)")
    route_prefix: str = Field("/", pattern=r"^/", description="URL prefix of the app (under `serve run` / `serve "
                              "deploy`: the application's route_prefix in the file).")
    num_replicas: int = Field(1, ge=1, description="Replicas, each with its own copy of the model (ignored with "
                              "autoscaling).")
    autoscaling: AutoscalingConfig | None = Field(None, description="Scale replicas with load instead of a fixed "
                                                  "number.")
    max_ongoing_requests: int = Field(32, ge=1, description="Requests a replica works on at once; more wait in "
                                      "Serve's queue.")
    max_queued_requests: int = Field(64, ge=0, description="Requests waiting for a replica; beyond it a request "
                                     "gets 503 at once (overload protection).")
    request_timeout_s: float = Field(120.0, gt=0, description="A request still generating after this long gets "
                                     "408 (a stream ends with an error event); its rows are freed.")
    stream_interval_ms: float = Field(50.0, ge=0, description="A stream sends what is ready at most this often "
                                      "(the first text at once): fewer, larger chunks through Serve's proxy when many "
                                      "clients stream. 0 sends every piece as it comes.")
    max_batch_size: int = Field(16, ge=1, description="Sequences the builtin engine decodes together per replica "
                                "(its KV cache rows); more wait for a free row.")
    prefill_chunk_tokens: int | None = Field(16, ge=1, description="Prompt tokens the builtin engine prefills per "
                                             "step, after decoding a token for every running stream: a long prompt "
                                             "goes in over several steps instead of stalling the streams. null "
                                             "prefills each prompt whole.")
    chat_template: str | None = Field(None, description="Jinja chat template for /v1/chat/completions, or a file "
                                      "holding one (null: the checkpoint's own, from chat_template in "
                                      "tokenizer_config.json beside tokenizer.json, else the plain template: a "
                                      "`role: content` line per message, then `assistant:`).")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs Ray reserves per replica.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica; the builtin engine runs on cuda when "
                                    "> 0.")
    torch_threads: int | None = Field(None, ge=1, description="Intra-op threads per replica (null: "
                                      "cpus_per_replica rounded up).")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

    @property
    def single_replica(self) -> bool:
        return self.num_replicas == 1 and self.autoscaling is None

    @model_validator(mode="after")
    def _fits(self):
        if self.limits.max_n > self.max_batch_size:
            raise ValueError(f"limits.max_n ({self.limits.max_n}) exceeds max_batch_size ({self.max_batch_size}): "
                             "a request's choices decode together")
        if self.ingress == "direct" and not self.single_replica:
            raise ValueError("ingress direct serves one replica on its port: with num_replicas above 1 or "
                             "autoscaling, set ingress: proxy (Serve's proxy spreads requests over the replicas)")
        if self.limits.default_max_tokens > self.limits.max_tokens:
            raise ValueError(f"limits.default_max_tokens ({self.limits.default_max_tokens}) exceeds "
                             f"limits.max_tokens ({self.limits.max_tokens})")
        return self


def load_serve_config(path: str | Path | None, overrides: list[str] = ()) -> ServeConfig:
    """A ServeConfig from a YAML file (or the defaults) and `--set dotted.path=value` overrides."""
    from pydantic import ValidationError

    tree = read_yaml(Path(path)) if path else {}
    for item in overrides:
        apply_override(tree, item, ServeConfig)
    try:
        return ServeConfig.model_validate(tree)
    except ValidationError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(where + format_validation_error(e, ServeConfig)) from None
