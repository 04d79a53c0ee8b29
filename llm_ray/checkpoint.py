"""Inference checkpoints: consolidated safetensors weights, tokenizer and resolved config.

A training checkpoint directory holds DeepSpeed's shards under ``deepspeed/`` (for
resuming) and, under ``model/``, what inference needs. Weights are only ever read
from safetensors, never unpickled.

The run's history (the progress rows and evaluations, one dict per event) is not in the
checkpoints, which would grow with the run: it lives in the run folder's ``history/``, one
JSON Lines file per checkpoint interval, ``<start>-<end>.jsonl`` holding the entries logged
after the checkpoint at step ``start`` up to the one at step ``end`` (the first file also holds
the untrained model's evaluation at step 0). A checkpoint records the folder and the step up
to which it holds the history; ``read_history`` follows the files back from that step, so a
file that a crashed run wrote past its last complete checkpoint is never read.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
from pathlib import Path
from typing import Iterator

import torch
import yaml
from safetensors.torch import load_file, save_file

from llm_ray.config import Config, model_spec
from llm_ray.model import GPT
from llm_ray.storage import Location

MODEL_DIR = "model"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
WEIGHTS = "model.safetensors"
TIED = ("lm_head.weight",)  # the same tensor as transformer.wte.weight
HISTORY_DIR = "history"  # in the run folder: the run's history, one file per checkpoint interval
HISTORY_FILE = re.compile(r"(\d+)-(\d+)\.jsonl")  # <start>-<end>.jsonl, steps
# Config fields of earlier versions that no longer exist (and change nothing at inference).
RETIRED_FIELDS = (("train", "shuffle_buffer_blocks"), ("data", "docs_per_pack_batch"))


def save_inference(directory: Path, state_dict: dict[str, torch.Tensor] | None, cfg: Config, tokenizer_json: str,
                   train_state: dict) -> Path:
    """The inference files in directory/model; state_dict None: model.safetensors is written already
    (streamed, see write_safetensors)."""
    out = Path(directory) / MODEL_DIR
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k not in TIED}
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
    """The resolved config saved in an inference folder (older versions' retired fields dropped)."""
    saved = yaml.safe_load((Path(model_dir) / "config.yaml").read_text(encoding="utf-8"))
    for section, key in RETIRED_FIELDS:  # checkpoints of older versions still load
        saved.get(section, {}).pop(key, None)
    return Config.model_validate(saved)


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
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if set(missing) - set(TIED) or unexpected:
        raise ValueError(f"{model_dir / WEIGHTS} does not fit the model in its config.yaml: "
                         f"missing {sorted(set(missing) - set(TIED))}, unexpected {sorted(unexpected)}")
    try:
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a plain Exception for a missing or bad file
        raise ValueError(f"{model_dir / 'tokenizer.json'} is missing or not a tokenizer: {e}") from None
    return model.to(device).eval(), tokenizer, cfg


def read_train_state(path: str | Path, history: bool = True) -> dict:
    """The training state a checkpoint was written with; history True: with the run's whole history
    up to the checkpoint's step under "history" (see read_history), else as stored."""
    model_dir = find_model_dir(path)
    state = json.loads((model_dir / "train_state.json").read_text(encoding="utf-8"))
    if history:
        state["history"] = read_history(model_dir, state)
    return state


# ------------------------------------------------------------------ the run's history


def write_history(folder: Location, start: int, end: int, entries: list[dict]) -> Location:
    """The entries logged after the checkpoint at step start up to the one at step end, as one file."""
    target = folder / f"{start:010d}-{end:010d}.jsonl"
    target.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return target


def history_files(folder: Location) -> dict[int, tuple[int, Location]]:
    """The history files in folder by the step they end at: {end: (start, file)}."""
    found = {}
    for file in folder.iterdir():
        match = HISTORY_FILE.fullmatch(file.name)
        if match:
            found[int(match[2])] = (int(match[1]), file)
    return found


def discard_history_after(folder: Location, step: int) -> list[str]:
    """Delete the history files that end after step: what a run wrote past the checkpoint a new run
    starts from (all of them for a fresh start). Returns their names."""
    stale = [file for end, (_, file) in history_files(folder).items() if end > step]
    for file in stale:
        file.filesystem.delete_file(file.path)
    return sorted(file.name for file in stale)


def history_chain(folder: Location, through_step: int, since_step: int = -1) -> list[Location]:
    """The files holding the history from after since_step up to through_step, oldest first: the file
    ending at through_step, then the one ending where it starts, and so on."""
    files, chain, end = history_files(folder), [], through_step
    while end > max(since_step, 0):
        if end not in files:
            raise FileNotFoundError(f"the run's history in {folder} has no file ending at step {end} "
                                    f"(<start>-{end:010d}.jsonl): it was removed, or the checkpoint was moved away "
                                    "from its run folder")
        start, file = files[end]
        if start >= end:
            raise ValueError(f"{file}: a history file must end after it starts")
        chain.append(file)
        end = start
    return chain[::-1]


def read_history(model_dir: Path, state: dict, since_step: int = -1) -> list[dict]:
    """The history entries of steps after since_step, up to the checkpoint's own: those in the run's
    history folder, then those the state holds itself (a checkpoint of an earlier version holds all)."""
    held = [h for h in state.get("history", []) if h["step"] > since_step]
    if not state.get("history_dir"):
        return held
    folder = Location(state["history_dir"])
    if folder.remote:  # the S3 settings (endpoint, region) are the run's; credentials come from the environment
        folder = Location.parse(state["history_dir"], read_config(model_dir).data.s3)
    entries = []
    for file in history_chain(folder, state["history_through"], since_step):
        entries += [json.loads(line) for line in file.read_text().splitlines() if line]
    return [h for h in entries if h["step"] > since_step] + held
