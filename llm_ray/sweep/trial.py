"""One trial of a sweep, run by Ray Tune as a function trainable.

The trial merges its searched values into the base config and validates the result (an invalid
combination fails this trial with its reason, never the sweep), checks the memory estimate
against the worker's memory (a trial that cannot fit is skipped before any worker starts), finds
or prepares its data, and then runs exactly what `llm-ray train` runs, with one Ray Train
callback that forwards the workers' reports to Tune. Its checkpoints, metrics, resume and W&B
run are a normal training run's, in <sweep>/trials/<trial name>/.

Trials run on any node of the cluster: what they share (their status, trial.json; the claims on the
data variants; the variants themselves) lives in the sweep folder as a storage Location, a local
folder (one machine, or a filesystem every node mounts) or an s3:// prefix.
"""

from __future__ import annotations

import copy

from llm_ray.config import Config, ConfigError, set_path, validate
from llm_ray.data.prepare import MANIFEST, data_dir, prepare
from llm_ray.data.stages import stage_key
from llm_ray.eval.run import evaluate
from llm_ray.storage import Location, StorageError, as_location
from llm_ray.sweep.claim import run_once
from llm_ray.sweep.memory import GIB, estimate_memory, worker_budget as budget
from llm_ray.train.trainer import train

EXPERIMENT = "tune"  # Ray Tune's experiment folder, in the sweep folder
STATUS_FILE = "trial.json"
DATA_SECTIONS = ("data", "cleaning", "dedup", "tokenizer")  # what the prepared data depends on


class TrialNotRun(Exception):
    """The trial was not launched; the message says why."""


class InvalidTrial(TrialNotRun):
    pass


class SkippedTrial(TrialNotRun):
    pass


def trial_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def sweep_location(plan: dict, key: str) -> Location:
    """A folder of the plan ("sweep_dir", "trials_dir": local paths or s3:// URIs) as a Location, with
    the sweep's S3 settings."""
    return Location.parse(plan[key], plan.get("s3"))


def tune_storage(folder: Location) -> tuple[str, object]:
    """(path, pyarrow filesystem or None) of Ray Tune's experiment in the sweep folder."""
    experiment = folder / EXPERIMENT
    return experiment.path, experiment.filesystem if experiment.remote else None


def with_values(base_tree: dict, values: dict, name: str, output_dir: str, group: str) -> Config:
    """The base config with the searched values, as a run named name in output_dir, W&B group group."""
    tree = copy.deepcopy(base_tree)
    for path, value in values.items():
        set_path(tree, path, value)
    tree["name"], tree["output_dir"] = name, output_dir
    set_path(tree, "tracking.group", group)
    return validate(tree)


def trial_config(plan: dict, values: dict, trial_id: str) -> Config:
    """The base config with the searched values, named and placed for this trial."""
    return with_values(plan["base_tree"], values, trial_name(trial_id), plan["trials_dir"], plan["sweep"])


def data_variant(cfg: Config) -> dict:
    return {s: getattr(cfg, s).model_dump(mode="json") for s in DATA_SECTIONS}


def worker_budget(plan: dict, cfg: Config) -> int | None:
    """Bytes one worker of this trial may use (see memory.worker_budget; trials share the nodes)."""
    return budget(plan["memory"], cfg, plan["concurrent_trials"])


def trial_data(plan: dict, cfg: Config, log=print) -> tuple[Location, str]:
    """(prepared data folder, "prepared" | "reused") for this trial's data settings.

    The base config's data goes where `llm-ray prepare` puts it (the sweep prepares it up front
    unless the space searches data settings); any other variant under <sweep>/data/<key of its
    settings>. The first trial that needs a variant prepares it, holding the variant's claim in
    <sweep>/data/<key>/ (see sweep.claim: trials on any node wait for it); every later trial with
    the same settings reuses it."""
    variant = data_variant(cfg)
    base = plan["base_data"]
    data_root = sweep_location(plan, "sweep_dir") / "data"
    if variant == base["variant"]:
        key, where = "base", cfg.model_copy(update={"output_dir": base["output_dir"], "name": base["name"]})
    else:
        key = stage_key("sweep-data", variant)
        where = cfg.model_copy(update={"output_dir": data_root.uri, "name": key})
    data = data_dir(where)

    def work() -> None:
        log(f"tune: preparing the data variant {key} for {cfg.name}")
        prepare(where, log=log)

    # manifest.json is written last, once every stage is complete
    prepared = run_once(data_root / key, data / MANIFEST, cfg.name, work, log)
    return data, "prepared" if prepared else "reused"


def objective_callback(objective: str, max_steps: int):
    """TuneReportCallback, forwarding the workers' reports that carry the objective (a checkpoint
    between evaluations has none, and Tune's searchers and schedulers need it in every result),
    except the last: the trial reports its final result itself once training has wrapped up, so
    a scheduler's stop at that point cannot cut the wrap-up short."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if objective in metrics[0] and metrics[0].get("step", 0) < max_steps:
                super().after_report(run_context, metrics, checkpoint)

    return ObjectiveReport()


def write_status(folder: Location, record: dict) -> None:
    (folder / STATUS_FILE).write_json(record)  # atomic: a reader never sees half (S3: a whole object)


def read_status(folder: Location | str, s3=None) -> dict | None:
    """The trial's status record in its folder (a Location, or a local path or URI with s3 settings)."""
    try:
        return (as_location(folder, s3) / STATUS_FILE).read_json()
    except (OSError, ValueError, StorageError):
        return None


def check_trial(plan: dict, values: dict, trial_id: str) -> tuple[Config, dict]:
    """(config, memory estimate) of a trial that can run; InvalidTrial or SkippedTrial otherwise,
    with its status written for the results table."""
    folder = sweep_location(plan, "trials_dir") / trial_name(trial_id)
    try:
        cfg = trial_config(plan, values, trial_id)
    except ConfigError as e:
        reason = str(e).replace("invalid configuration:\n  ", "").replace("\n  ", "; ")
        write_status(folder, {"status": "invalid", "reason": reason, "values": values})
        raise InvalidTrial(f"invalid combination: {reason}") from None
    estimate = estimate_memory(cfg)
    budget = worker_budget(plan, cfg)
    record = {"values": values, "memory_estimate_gib": round(estimate.total / GIB, 3),
              "memory_budget_gib": round(budget / GIB, 3) if budget else None}
    if budget is not None and estimate.total > budget:
        reason = f"needs about {estimate.describe()}; a worker has {budget / GIB:.2f} GiB"
        write_status(folder, {**record, "status": "skipped", "reason": reason})
        raise SkippedTrial(f"not launched: {reason}")
    return cfg, record


def run_trial(values: dict, plan: dict) -> None:
    """The Tune function trainable (plan comes through tune.with_parameters)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    folder = sweep_location(plan, "trials_dir") / trial_name(trial_id)
    status = read_status(folder)
    if status and status.get("status") == "finished":  # a restored sweep whose snapshot predates the end
        tune.report(status["result"])
        return
    cfg, record = check_trial(plan, values, trial_id)
    data_path, record["data"] = trial_data(plan, cfg)
    record["data_path"] = data_path.uri
    write_status(folder, {**record, "status": "running"})
    result = train(cfg, data_path, callbacks=(objective_callback(plan["objective"], cfg.train.max_steps),))
    final = {"step": result.step, "tokens": result.step * cfg.train.total_batch_tokens,
             "val_loss": result.val_loss, "checkpoint_dir": result.checkpoint}
    if plan["objective"] == "bits_per_byte":

        report = evaluate(result.checkpoint, data_path=data_path)
        final["bits_per_byte"] = report["bits_per_byte"]["value"]
    write_status(folder, {**record, "status": "finished", "result": final})
    tune.report(final)
