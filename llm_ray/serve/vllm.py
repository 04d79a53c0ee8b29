"""engine: vllm — Ray Serve LLM (vLLM's paged attention and continuous batching) on GPU clusters.

The app is Ray's own OpenAI app (``ray.serve.llm.build_openai_app``) over the Hugging Face
export of a checkpoint (``llm-ray export``: a local folder, or an s3:// copy of it). This
module only translates a ServeConfig into Ray's ``LLMConfig``; vLLM itself is the optional
``[vllm]`` extra, installed on GPU nodes.

Provenance: Ray Serve LLM's /v1/models cards carry no custom fields, so the model id names
the run and step (``<run>@<step>``) and the export folder holds ``llm_ray_provenance.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from llm_ray.checkpoint.provenance import export_provenance
from llm_ray.config import ConfigError
from llm_ray.config.serve import ServeConfig
from llm_ray.serve.options import deployment_options

# Settings of the builtin engine that Ray Serve LLM has no place for: refused when set, not ignored.
BUILTIN_ONLY = ("limits", "request_timeout_s", "cpus_per_replica", "gpus_per_replica", "torch_threads",
                "prefill_chunk_tokens", "chat_template")


def llm_config(cfg: ServeConfig) -> dict:
    """The LLMConfig (as a dict) for Ray Serve LLM, from the serve config and the export folder.

    max_batch_size becomes vLLM's max_num_seqs, stream_interval_ms Ray Serve LLM's
    stream_batching_interval_ms; GPUs per replica are vllm.tensor_parallel_size."""
    defaults = ServeConfig()
    changed = [f for f in BUILTIN_ONLY if getattr(cfg, f) != getattr(defaults, f)]
    if changed:
        raise ConfigError(f"engine vllm: {', '.join(changed)} apply to the builtin engine only; Ray Serve LLM "
                          "does not take them (leave them unset, or use vllm.engine_kwargs for vLLM's own limits)")
    source = cfg.checkpoint
    if source is None:
        raise ConfigError("checkpoint: engine vllm serves a Hugging Face export: `llm-ray export --checkpoint DIR "
                          "--out EXPORT`, then --checkpoint EXPORT (a local folder or an s3:// URI)")
    context = None
    if not source.startswith("s3://"):
        folder = Path(source).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"checkpoint: {folder} has no config.json: engine vllm needs a Hugging Face export "
                              "(`llm-ray export`), not an llm-ray checkpoint folder")
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        context = hf.get("n_positions") or hf.get("max_position_embeddings")
        source = str(folder)
    provenance = export_provenance(source) or {}
    model_id = cfg.model_id or (f"{provenance['run']}@{provenance['step']}" if provenance else Path(source).name)
    deployment = deployment_options(cfg)
    del deployment["ray_actor_options"]  # Ray Serve LLM sizes its replicas from the engine settings
    engine = {"tensor_parallel_size": cfg.vllm.tensor_parallel_size,
              "gpu_memory_utilization": cfg.vllm.gpu_memory_utilization, "max_num_seqs": cfg.max_batch_size}
    if context:
        engine["max_model_len"] = context
    engine.update(cfg.vllm.engine_kwargs)
    config = {"model_loading_config": {"model_id": model_id, "model_source": source},
              "deployment_config": deployment, "engine_kwargs": engine,
              "experimental_configs": {"stream_batching_interval_ms": cfg.stream_interval_ms}}
    if cfg.vllm.accelerator_type:
        config["accelerator_type"] = cfg.vllm.accelerator_type
    return config


def validated(config: dict):
    """Ray's LLMConfig for the dict: its own schema checks every field (no vLLM needed for that)."""
    from pydantic import ValidationError

    try:
        from ray.serve.llm import LLMConfig
    except ImportError:  # ray.serve.llm imports vLLM; the config class itself does not need it
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    try:
        return LLMConfig.model_validate(config)
    except ValidationError as e:
        raise ConfigError(f"engine vllm: Ray Serve LLM refuses the config: {e}") from None


def build_vllm_app(cfg: ServeConfig):
    """Ray Serve LLM's OpenAI app for the export; needs vLLM (pip install 'llm-ray[vllm]') where it runs."""
    config = validated(llm_config(cfg))
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as e:
        raise ConfigError(f"engine vllm needs vLLM: pip install 'llm-ray[vllm]' on the GPU nodes ({e})") from None
    return build_openai_app({"llm_configs": [config]})
