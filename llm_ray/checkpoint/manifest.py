"""Complete checkpoints: manifests, verification, the newest checkpoint that verifies.

Every worker writes, beside its part of a checkpoint, a manifest of the files it wrote
(size and sha256), after everything else, so that the manifests of all workers together
mean a complete checkpoint. Before training, the driver lists the run's checkpoints, newest
first, and resumes from the first whose files all match their manifests: a checkpoint left
damaged by a full disk or a node lost mid-save is skipped, with the reason. Serving uses the
same check to leave out checkpoints still being written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pyarrow import fs

from llm_ray.checkpoint.inference import MODEL_DIR
from llm_ray.checkpoint.state import TrainState

MANIFEST_DIR = "_manifest"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folder names: checkpoint_<date and time>


class ResumeError(Exception):
    """The run's checkpoints cannot be resumed, described for the user."""


# ------------------------------------------------------------------ manifests


def _sha256(stream) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | Path, rank: int, world_size: int) -> Path:
    """Record every file under directory (this worker's part of a checkpoint) with its size and
    sha256 in directory/_manifest/rank-NNNNN.json. Call it last: the manifest means complete."""
    root = Path(directory)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and MANIFEST_DIR not in p.relative_to(root).parts):
        with open(path, "rb") as f:
            files[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(f)}
    out = root / MANIFEST_DIR / f"rank-{rank:05d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rank": rank, "world_size": world_size, "files": files}, indent=1))
    return out


def read_manifests(filesystem, path: str) -> tuple[list[dict], str | None]:
    """(the manifests of the checkpoint at path, why they do not make a whole checkpoint or None): every
    worker's manifest is there. Cheap (a listing and the small manifest files); verify also checks the files."""
    try:
        listing = filesystem.get_file_info(fs.FileSelector(f"{path}/{MANIFEST_DIR}", allow_not_found=True))
        manifests = [json.loads(_read(filesystem, i.path)) for i in listing if i.path.endswith(".json")]
    except (OSError, ValueError) as e:
        return [], f"its manifest cannot be read ({type(e).__name__})"
    if not manifests:
        return [], "no manifest: the save did not finish"
    world = manifests[0]["world_size"]
    missing = sorted(set(range(world)) - {m["rank"] for m in manifests})
    if missing:
        return manifests, f"the manifests of workers {missing} of {world} are missing: the save did not finish"
    return manifests, None


def verify(filesystem, path: str) -> str | None:
    """Why the checkpoint at path (on a pyarrow filesystem) is not complete and intact, or None."""
    manifests, why = read_manifests(filesystem, path)
    if why:
        return why
    for manifest in manifests:
        for name, expected in sorted(manifest["files"].items()):
            info = filesystem.get_file_info(f"{path}/{name}")
            if info.type != fs.FileType.File:
                return f"{name} is missing"
            if info.size != expected["size"]:
                return f"{name} has {info.size} bytes, {expected['size']} were written"
            with filesystem.open_input_stream(f"{path}/{name}") as f:
                if _sha256(f) != expected["sha256"]:
                    return f"{name} does not match its checksum"
    return None


def _read(filesystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as f:
        return f.read()


# ------------------------------------------------------------------ choosing the checkpoint


@dataclass
class ResumePoint:
    """The newest checkpoint that verified (None: start fresh) and the newer ones skipped."""

    path: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def find_resume_point(filesystem, run_path: str) -> ResumePoint:
    """Verify the run's checkpoints newest first; raise ResumeError when there are some and none verifies."""
    try:
        entries = filesystem.get_file_info(fs.FileSelector(run_path, allow_not_found=True))
    except OSError as e:
        raise ResumeError(f"cannot list the checkpoints in {run_path}: {e}") from None
    folders = sorted((e.path for e in entries if e.type == fs.FileType.Directory
                      and e.base_name.startswith(CHECKPOINT_PREFIX)), reverse=True)  # the names sort by time
    point = ResumePoint()
    for path in folders:
        why = verify(filesystem, path)
        if why is None:
            point.path = path
            return point
        point.skipped.append((path, why))
    if point.skipped:
        listing = "\n  ".join(f"{p}: {why}" for p, why in point.skipped)
        raise ResumeError(f"no checkpoint of this run in {run_path} is complete:\n  {listing}\nStart a new run "
                          "(--set name=...), or move the run folder away to start this one afresh")
    return point


def newest_complete(filesystem, run_path: str, newer_than: str = "", checksums: bool = True) -> str | None:
    """The newest checkpoint of the run whose folder name sorts after newer_than and that verifies, or None.
    checksums False: every worker's manifest is there (read_manifests: cheap), enough where each worker
    uploads its manifest last (train.upload), not where Ray copies the folder in any order. For a restart
    within a run: Ray Train registers a checkpoint only once its controller has collected every worker's
    report, so the workers may have written newer complete ones when they fail."""
    try:
        entries = filesystem.get_file_info(fs.FileSelector(run_path, allow_not_found=True))
    except OSError:
        return None
    folders = sorted((e.path for e in entries if e.type == fs.FileType.Directory
                      and e.base_name.startswith(CHECKPOINT_PREFIX) and e.base_name > newer_than), reverse=True)
    check = verify if checksums else (lambda f, path: read_manifests(f, path)[1])
    return next((path for path in folders if check(filesystem, path) is None), None)


def read_checkpoint_files(filesystem, path: str) -> tuple[TrainState, dict, str]:
    """(training state, resolved config as a dict, tokenizer JSON) a checkpoint was written with."""
    model = f"{path}/{MODEL_DIR}"
    state = TrainState(**json.loads(_read(filesystem, f"{model}/train_state.json")))
    config = yaml.safe_load(_read(filesystem, f"{model}/config.yaml"))
    return state, config, _read(filesystem, f"{model}/tokenizer.json").decode("utf-8")


def read_saved_config(checkpoint_dir: str) -> dict:
    """The resolved config a local checkpoint folder was written with, as a plain dict."""
    return yaml.safe_load((Path(checkpoint_dir) / MODEL_DIR / "config.yaml").read_text(encoding="utf-8"))
