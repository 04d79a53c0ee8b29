"""What a checkpoint records of its run besides the weights: the training state (train_state.json)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    """What a resumed run needs besides model and optimizer (DeepSpeed saves those)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    tokens: int = 0  # training tokens consumed, all workers
    samples: int = 0  # position in the global block stream: blocks consumed by all workers (see train.data)
    world_size: int = 0  # workers of the run that wrote this state
    data_key: str | None = None  # the prepared data's pack-stage key: the stream positions refer to it
    data_path: str | None = None  # the prepared data folder trained on (evaluation reads its held-out split)
    # Logged and evaluation metrics, one dict per event, since the last checkpoint: at each checkpoint
    # they go to the run's history folder (see checkpoint.history), so a checkpoint does not grow
    # with the run.
    history: list[dict] = field(default_factory=list)
    history_dir: str | None = None  # the run's history folder (a local path or s3:// URI)
    history_through: int = 0  # the step up to which history_dir holds the history
    tracker_run_id: str | None = None  # the W&B run a resumed run continues
    resumed_from: list[int] = field(default_factory=list)  # checkpoint steps this run restarted from
    # [step, workers] at the start and at each change of the worker count (an elastic run's history)
    world_sizes: list[list[int]] = field(default_factory=list)
    stopped_at: list[int] = field(default_factory=list)  # steps at which a stop request (SIGTERM) ended a run
    skipped_batches: int = 0  # micro-batches the loss guard rejected
    parameters: int = 0  # elements of the whole model (tied weights once)
    parameters_held: list[int] = field(default_factory=list)  # elements each worker held after building
    worker_nodes: list[str] = field(default_factory=list)  # the Ray node id of each worker (rank order)
    # Seconds from the command's start to this run's first optimizer step (Ray, DeepSpeed, data, the
    # untrained model's evaluation): what a short run pays before it trains.
    startup_seconds: float | None = None
    # Where those seconds went: each start-up milestone's seconds after the command's start, in order
    # ("ray" up, "trainer" handed to Ray Train, "worker" entered, "engine" built, "data" opened,
    # "untrained_eval" done, "first_step" done).
    startup_phases: dict[str, float] = field(default_factory=dict)
