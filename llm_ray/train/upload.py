"""Checkpoints to remote storage (S3), by default in the background so that training does not wait.

Each worker writes its part of a checkpoint to its node's disk and reports it to Ray Train, which runs
``CheckpointUploads.upload``: with ``checkpoint_upload_mode=ASYNC`` (train.checkpoint_upload async) in its
upload thread while the worker trains on, with SYNC before the report returns. Either way:
- its manifest goes last (files first, then ``_manifest/rank-N.json``), so a half-uploaded checkpoint
  never verifies (see checkpoint.manifest) and is never resumed from;
- at most one upload is in flight: the next checkpoint first waits for the previous upload (that wait
  counts as checkpoint time; nothing queues up on the disk);
- a file that fails is retried (``attempts``, with backoff, beyond the AWS SDK's own retries of each
  request: for an outage longer than those); when it still fails, the worker says so and training goes
  on. That checkpoint has no manifest of this worker, so resuming skips it for the newest complete one.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
import time
from pathlib import Path

from llm_ray.checkpoint.location import checkpoint_location
from llm_ray.checkpoint.manifest import MANIFEST_DIR
from llm_ray.config import Config
from llm_ray.storage import Location, node_cache

ATTEMPTS = 3
BACKOFF_S = 2.0


class UploadFailed(Exception):
    pass


class CheckpointUploads:
    """One worker's checkpoint uploads to `run` (<storage>/<run name>, remote); background: Ray's ASYNC mode."""

    def __init__(self, run: Location, rank: int, log, background: bool = True, attempts: int = ATTEMPTS,
                 backoff_s: float = BACKOFF_S):
        self.run, self.rank, self.log, self.background = run, rank, log, background
        self.attempts, self.backoff_s = attempts, backoff_s
        self._idle = threading.Event()
        self._idle.set()
        # This worker's local copies wait here for their upload; what a crashed worker left is cleared.
        self.staging = node_cache("uploads", hashlib.sha256(run.uri.encode()).hexdigest()[:16], f"rank-{rank}")
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)

    def local_folder(self) -> str:
        """A new folder for the next checkpoint, once the previous upload is done (at most one in flight)."""
        self._idle.wait()
        return tempfile.mkdtemp(prefix="checkpoint-", dir=self.staging)

    def started(self) -> None:
        self._idle.clear()

    def upload_abandoned(self) -> None:
        """The report did not go through: no upload will run for it."""
        self._idle.set()

    def upload(self, checkpoint, dir_name: str):
        """Ray Train's checkpoint_upload_fn (in its upload thread): this worker's files, manifest last."""
        import ray.train

        target = self.run / dir_name
        try:
            root = Path(checkpoint.path)
            files = sorted((p for p in root.rglob("*") if p.is_file()),
                           key=lambda p: (MANIFEST_DIR in p.relative_to(root).parts, p.as_posix()))
            for file in files:
                self._put(file, target / file.relative_to(root).as_posix())
        except UploadFailed as e:
            self.log(f"checkpoint upload failed on worker {self.rank} after {self.attempts} attempts: {e}; training "
                     f"goes on, and resuming skips {target.uri} (no manifest of this worker) for the newest "
                     f"complete checkpoint")
        finally:
            self._idle.set()
        return ray.train.Checkpoint(target.path, filesystem=target.filesystem)

    def _put(self, file: Path, target: Location) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                target.upload(file)
                return
            except OSError as e:
                if attempt == self.attempts:
                    raise UploadFailed(f"{target.uri}: {e}") from None
                time.sleep(self.backoff_s * attempt)


def remote_uploads(cfg: Config, rank: int, log) -> CheckpointUploads | None:
    """This worker's checkpoint uploads for checkpoints on remote storage (S3), else None (Ray copies them)."""
    location = checkpoint_location(cfg)[0]
    if not location.remote:
        return None
    return CheckpointUploads(location / cfg.name, rank, log, background=cfg.train.checkpoint_upload == "async")


def report_uploaded(uploads: CheckpointUploads, metrics: dict, write) -> None:
    """write(folder) this worker's part of a checkpoint to its disk, once the previous upload is done, and
    report it to Ray Train, which uploads it (see train.upload), in the background or before it returns,
    and deletes the folder."""
    import ray.train

    folder = uploads.local_folder()
    mode = ray.train.CheckpointUploadMode.ASYNC if uploads.background else ray.train.CheckpointUploadMode.SYNC
    try:
        write(folder)
        uploads.started()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=uploads.upload)
    except BaseException:
        uploads.upload_abandoned()
        shutil.rmtree(folder, ignore_errors=True)
        raise
