"""Which checkpoint to serve or export: the best by validation loss.

Plain files: a checkpoint's ``model/`` folder holds ``train_state.json``, which names the run's
history folder (see ``checkpoint.read_history``), whose validation losses say how good each
checkpoint is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyarrow import fs

from llm_ray.checkpoint.history import read_history, read_train_state
from llm_ray.checkpoint.inference import MODEL_DIR, WEIGHTS
from llm_ray.checkpoint.manifest import CHECKPOINT_PREFIX, verify


class CheckpointChoiceError(Exception):
    """No checkpoint can be chosen, described for the user."""


@dataclass(frozen=True)
class Choice:
    model_dir: Path
    step: int
    val_loss: float
    compared: int  # checkpoints with a validation loss that were compared


def val_loss_at_step(state: dict) -> float | None:
    """The validation loss measured at the checkpoint's own step, if one was."""
    losses = [h["val_loss"] for h in state.get("history", []) if h.get("step") == state.get("step")
              and "val_loss" in h]
    return losses[-1] if losses else None


def read_state(model_dir: Path) -> dict:
    """The checkpoint's training state with the history entries of its own step only (what
    val_loss_at_step needs), or none when the run's history is not where the checkpoint says (a
    model folder copied away from its run): it is then served without a validation loss."""
    state = read_train_state(model_dir, history=False)
    try:
        state["history"] = read_history(model_dir, state, since_step=state.get("step", 0) - 1)
    except FileNotFoundError:
        state["history"] = []
    return state


def model_dirs(folder: Path) -> list[Path]:
    """Every complete checkpoint's inference folder under folder, once: checkpoints still being written,
    or damaged, fail their manifest check and are left out, and a copy of a checkpoint's inference files
    (the run's published model/, the same train_state.json) counts as that checkpoint."""
    found, seen = [], set()
    # Checkpoint folders first, so that a copy is the one left out.
    candidates = sorted(folder.rglob(WEIGHTS), key=lambda w: (not _in_checkpoint(w.parent), w))
    for weights in candidates:
        model_dir = weights.parent
        if not (model_dir / "train_state.json").is_file():
            continue  # e.g. a Hugging Face export
        if _in_checkpoint(model_dir) and verify(fs.LocalFileSystem(), str(model_dir.parent.resolve())) is not None:
            continue
        state = (model_dir / "train_state.json").read_bytes()
        if state not in seen:
            seen.add(state)
            found.append(model_dir)
    return sorted(found)


def _in_checkpoint(model_dir: Path) -> bool:
    return model_dir.name == MODEL_DIR and model_dir.parent.name.startswith(CHECKPOINT_PREFIX)


def best_checkpoint(folder: Path, what: str) -> Choice:
    """The checkpoint under folder with the lowest validation loss at its own step."""
    if not folder.is_dir():
        raise CheckpointChoiceError(f"{what}: {folder} is not a folder")
    scored = []
    dirs = model_dirs(folder)
    for model_dir in dirs:
        state = read_state(model_dir)
        loss = val_loss_at_step(state)
        if loss is not None:
            scored.append(Choice(model_dir.resolve(), state["step"], loss, 0))
    if not scored:
        why = ("no complete checkpoint" if not dirs else
               f"none of its {len(dirs)} checkpoints has a validation loss at its step (train.checkpoint_every "
               "should be a multiple of train.eval_every)")
        raise CheckpointChoiceError(f"{what}: {folder} has {why}")
    best = min(scored, key=lambda c: (c.val_loss, -c.step))  # on a tie, the later checkpoint
    return Choice(best.model_dir, best.step, best.val_loss, len(scored))


def find_folder(name_or_dir: str, output_dir: str, what: str) -> Path:
    """A run or sweep folder given as a path, or as a name under output_dir."""
    given = Path(name_or_dir).expanduser()
    for candidate in (given, Path(output_dir).expanduser() / name_or_dir):
        if candidate.is_dir():
            return candidate.resolve()
    raise CheckpointChoiceError(f"{what} {name_or_dir}: neither {given} nor {Path(output_dir) / name_or_dir} is a "
                                "folder")
