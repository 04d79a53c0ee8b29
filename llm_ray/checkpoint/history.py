"""The run's history: the progress rows and evaluations, one dict per event.

The history is not in the checkpoints, which would grow with the run: it lives in the run
folder's ``history/``, one JSON Lines file per checkpoint interval, ``<start>-<end>.jsonl``
holding the entries logged after the checkpoint at step ``start`` up to the one at step ``end``
(the first file also holds the untrained model's evaluation at step 0). A checkpoint records the
folder and the step up to which it holds the history; ``read_history`` follows the files back from
that step, so a file that a crashed run wrote past its last complete checkpoint is never read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from llm_ray.checkpoint.inference import find_model_dir, read_config
from llm_ray.storage import Location

HISTORY_DIR = "history"  # in the run folder: the run's history, one file per checkpoint interval
HISTORY_FILE = re.compile(r"(\d+)-(\d+)\.jsonl")  # <start>-<end>.jsonl, steps


def read_train_state(path: str | Path, history: bool = True) -> dict:
    """The training state a checkpoint was written with; history True: with the run's whole history
    up to the checkpoint's step under "history" (see read_history), else as stored."""
    model_dir = find_model_dir(path)
    state = json.loads((model_dir / "train_state.json").read_text(encoding="utf-8"))
    if history:
        state["history"] = read_history(model_dir, state)
    return state

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
    """The history entries of steps after since_step, up to the checkpoint's own, from the run's
    history folder (none when the state names no folder: a model saved outside a training run)."""
    if not state.get("history_dir"):
        return []
    folder = Location(state["history_dir"])
    if folder.remote:  # the S3 settings (endpoint, region) are the run's; credentials come from the environment
        folder = Location.parse(state["history_dir"], read_config(model_dir).data.s3)
    entries = []
    for file in history_chain(folder, state["history_through"], since_step):
        entries += [json.loads(line) for line in file.read_text().splitlines() if line]
    return [h for h in entries if h["step"] > since_step]
