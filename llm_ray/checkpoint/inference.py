"""Inference checkpoints: consolidated safetensors weights, tokenizer and resolved config.

A training checkpoint directory holds DeepSpeed's shards under ``deepspeed/`` (for
resuming) and, under ``model/``, what inference needs. Weights are only ever read
from safetensors, never unpickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from pathlib import Path
from typing import Iterator

import torch
import yaml
from safetensors.torch import load_file, save_file

from llm_ray.config import Config, model_spec
from llm_ray.model import GPT

MODEL_DIR = "model"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
WEIGHTS = "model.safetensors"


def tied_names(spec) -> tuple[str, ...]:
    """State-dict names that are another parameter's tensor, left out of model.safetensors: the output
    layer's weight when it is the token embedding's (spec.tie_embeddings)."""
    return ("lm_head.weight",) if spec.tie_embeddings else ()


def save_inference(directory: Path, state_dict: dict[str, torch.Tensor] | None, cfg: Config, tokenizer_json: str,
                   train_state: dict) -> Path:
    """The inference files in directory/model; state_dict None: model.safetensors is written already
    (streamed, see write_safetensors)."""
    out = Path(directory) / MODEL_DIR
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        tied = tied_names(model_spec(cfg))
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k not in tied}
        save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    (out / "train_state.json").write_text(json.dumps(train_state, indent=2), encoding="utf-8")
    return out


def write_safetensors(path: Path | None, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterator[torch.Tensor]) -> None:
    """A safetensors file written one tensor at a time, so that only one needs to be in memory.

    safetensors' own writer takes every tensor at once. The format is simple and fixed: the length
    of a JSON header (8 bytes, little-endian), the header (each name's dtype, shape and byte range,
    padded with spaces to 8 bytes), then the tensors' bytes in that order. specs: (name, dtype,
    shape) of each tensor, in the order tensors yields them. path None: tensors are consumed
    without writing (the other workers' part of each gather under ZeRO-3).
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(path, "wb")) if path is not None else None
        if f:
            f.write(struct.pack("<Q", len(blob)) + blob)
        for (name, dtype, shape), tensor in zip(specs, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, announced {shape} {dtype}")
            if f:
                f.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def find_model_dir(path: str | Path) -> Path:
    """The folder with the inference files, given it or the checkpoint folder above it."""
    path = Path(path).expanduser()
    for candidate in (path, path / MODEL_DIR):
        if (candidate / WEIGHTS).is_file():
            return candidate
    raise FileNotFoundError(f"no {WEIGHTS} in {path} or {path / MODEL_DIR}: not an llm-ray checkpoint")


def read_config(model_dir: Path) -> Config:
    """The resolved config saved in an inference folder."""
    return Config.model_validate(yaml.safe_load((Path(model_dir) / "config.yaml").read_text(encoding="utf-8")))


def load_model(path: str | Path, device: str = "cpu") -> tuple[GPT, "object", Config]:
    """(model in eval mode, tokenizer, config) from a checkpoint folder."""
    from tokenizers import Tokenizer

    model_dir = find_model_dir(path)
    try:
        cfg = read_config(model_dir)
    except (OSError, yaml.YAMLError, ValueError, AttributeError) as e:
        raise ValueError(f"{model_dir / 'config.yaml'} is missing or not an llm-ray config: "
                         f"{str(e).splitlines()[0]}") from None
    model = GPT(model_spec(cfg))
    try:
        state = load_file(str(model_dir / WEIGHTS), device=device)
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{model_dir / WEIGHTS} is not a readable safetensors file: {e}") from None
    tied = set(tied_names(model.spec))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing, unexpected = set(missing) - tied, set(unexpected) | (tied & set(state))  # a tied name is no tensor
    if missing or unexpected:
        raise ValueError(f"{model_dir / WEIGHTS} does not fit the model in its config.yaml: "
                         f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    try:
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a plain Exception for a missing or bad file
        raise ValueError(f"{model_dir / 'tokenizer.json'} is missing or not a tokenizer: {e}") from None
    return model.to(device).eval(), tokenizer, cfg
