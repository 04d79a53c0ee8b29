"""What a served or exported model is: its data, run, config, checkpoint and scores.

Served models report it in ``/v1/models``; ``llm-ray export`` writes it beside the Hugging Face
files as ``llm_ray_provenance.json`` (Ray Serve LLM's model cards carry no custom fields).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llm_ray.checkpoint.best import val_loss_at_step

EVAL_FIGURES = ("loss", "perplexity", "bits_per_byte")
PROVENANCE = "llm_ray_provenance.json"


def export_provenance(source: str) -> dict | None:
    """The provenance `llm-ray export` wrote beside a local export (None for s3://, or a folder without one)."""
    path = Path(source).expanduser() / PROVENANCE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def config_hash(cfg) -> str:
    """A short, stable hash of a resolved config: the same settings give the same hash."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def evaluation_of(model_dir: Path, cfg) -> dict | None:
    """`llm-ray eval`'s figures for this very checkpoint, when it was evaluated."""
    run = [] if cfg.run_location.remote else [cfg.run_dir]  # a run on S3: its copy's folders only
    for folder in (*run, *list(model_dir.parents)[:4]):
        path = folder / "eval" / "eval.json"
        if not path.is_file():
            continue
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        scored = Path(results.get("checkpoint", ""))
        same = scored.resolve() == model_dir.resolve() if scored.is_absolute() else scored.parts[-2:] == model_dir.parts[-2:]
        if same:
            figures = {k: results[k]["value"] for k in EVAL_FIGURES if isinstance(results.get(k), dict)}
            for k in ("bleu", "rouge1", "rouge2", "rougeL"):
                if k in results.get("continuation", {}):
                    figures[k] = results["continuation"][k]
            return {**figures, "split": results.get("split"), "report": str(path.parent)}
    return None


def provenance(model_dir: Path, cfg, state: dict, parameters: int) -> dict:
    """What the served model is: its data, run, config, checkpoint and scores."""
    return {
        "run": cfg.name,
        "config_sha256": config_hash(cfg),
        "checkpoint": str(model_dir),
        "step": state.get("step"),
        "tokens": state.get("tokens"),
        "val_loss": val_loss_at_step(state),
        "data_key": state.get("data_key"),
        "data_path": state.get("data_path"),
        "parameters": parameters,
        "context_length": cfg.model.context_length,
        "evaluation": evaluation_of(model_dir, cfg),
    }
