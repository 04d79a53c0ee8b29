"""`llm-ray tune`: a sweep file turned into a Ray Tune experiment, started or restored.

Layout of <output_dir>/<sweep name>/, a local folder or an s3:// prefix (trials on every node read and
write it; a local one on a multi-node cluster must be on a filesystem every node mounts):

    sweep.yaml        the sweep file as run (a --resume must match it)
    tune/             Ray Tune's experiment state: trials, searcher state, results
    trials/<trial>/   each trial's training run: checkpoints, W&B, trial.json (its status)
    data/<key>/       prepared data variants, when the space searches data settings, and the
                      claims of the trials preparing them (see sweep.claim)
    results.csv, best_config.yaml, history.png, parallel.png (see sweep.results)
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from llm_ray.config import Config, ConfigError, apply_override, read_source, validate
from llm_ray.config.loading import PRESETS
from llm_ray.config.sweep import Dimension, SweepConfig
from llm_ray.data.prepare import data_dir, prepare
from llm_ray.ray_utils import alive_nodes, init_ray
from llm_ray.storage import Location, S3Settings, StorageError, check_shared, check_writable
from llm_ray.sweep.memory import cluster_memory as measured
from llm_ray.sweep.results import summarize, write_results
from llm_ray.sweep.trial import DATA_SECTIONS, EXPERIMENT, data_variant, run_trial, tune_storage

# Tune snapshots its experiment (trials, searcher) at most this often; a driver killed with
# SIGKILL loses what happened since the last snapshot. Its default is 10 s or more.
SNAPSHOT_SECONDS = "2"


def base_tree(sweep: SweepConfig, sweep_folder: Path) -> dict:
    """The base config's raw tree with the fixed overrides; a relative base path is read next
    to the sweep file."""
    source = sweep.base
    if source not in PRESETS and not Path(source).expanduser().is_absolute():
        source = str(sweep_folder / source)
    tree = read_source(source)
    for assignment in sweep.overrides:
        apply_override(tree, assignment)
    try:
        validate(tree)
    except ConfigError as e:
        raise ConfigError(f"the sweep's base config ({sweep.base} with its overrides): {e}") from None
    return tree


def output_field(sweep: SweepConfig) -> str:
    """The setting that places the sweep folder, for messages."""
    return "output_dir" if sweep.output_dir else f"output_dir of the base config ({sweep.base})"


def sweep_dir(sweep: SweepConfig, base: Config) -> Location:
    """<output_dir>/<sweep name>: a local folder or an s3:// prefix (reached with the base's data.s3)."""
    try:
        return Location.parse(sweep.output_dir or base.output_dir, base.data.s3, output_field(sweep)) / sweep.name
    except StorageError as e:
        raise ConfigError(str(e)) from None


def check_sweep_storage(folder: Location, sweep: SweepConfig, base: Config) -> None:
    """Trials run on any node and write their status and data into the sweep folder: S3 must be
    writable, and a local folder on a multi-node cluster must be shared (data.shared_filesystem)."""
    field = output_field(sweep)
    try:
        if folder.remote:
            check_writable(folder, field)
        check_shared({field: folder}, alive_nodes(), base.data.shared_filesystem)
    except StorageError as e:
        raise ConfigError(str(e)) from None


def tune_space(dims: list[Dimension], grid: bool) -> dict:
    from ray import tune

    space = {}
    for d in dims:
        if d.kind == "choice":
            space[d.path] = tune.grid_search(list(d.values)) if grid else tune.choice(list(d.values))
        elif d.kind == "uniform":
            space[d.path] = tune.uniform(d.low, d.high)
        elif d.kind == "loguniform":
            space[d.path] = tune.loguniform(d.low, d.high)
        elif d.kind == "randint":
            space[d.path] = tune.randint(d.low, d.high + 1)  # Tune's upper end is excluded; ours is not
        else:
            space[d.path] = tune.lograndint(d.low, d.high + 1)
    return space


def make_sampler(algorithm: str, seed: int | None, startup_trials: int):
    """The Optuna sampler behind each searcher (also used by benchmarks/tune_efficiency.py)."""
    import optuna

    if algorithm == "bayes":  # Gaussian process; integers and categories handled natively
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials)
    if algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"no Optuna sampler for search.algorithm {algorithm!r}")


def make_searcher(sweep: SweepConfig):
    """OptunaSearch for bayes, tpe and random; None (Tune's grid and variant generator) for grid."""
    if sweep.search.algorithm == "grid":
        return None
    from ray.tune.search.optuna import OptunaSearch

    s = sweep.search
    return OptunaSearch(sampler=make_sampler(s.algorithm, s.seed, s.startup_trials))  # metric: TuneConfig


def make_scheduler(sweep: SweepConfig, base: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sc = sweep.scheduler
    if sc.kind == "none":
        return FIFOScheduler()
    max_t = base.train.max_steps * (base.train.total_batch_tokens if sc.time_attr == "tokens" else 1)
    if sc.grace_period >= max_t:
        raise ConfigError(f"scheduler.grace_period ({sc.grace_period}) must be below the trials' length in "
                          f"{sc.time_attr} ({max_t}), or ASHA never stops anything")
    # Rungs sit at grace_period x reduction_factor^k below max_t; a trial's final result (at
    # max_t) comes from the trial itself, after its training wrapped up (see trial.objective_callback).
    return ASHAScheduler(time_attr=sc.time_attr, max_t=max_t, grace_period=sc.grace_period,
                         reduction_factor=sc.reduction_factor)  # metric and mode: from TuneConfig


def cluster_memory(sweep: SweepConfig, may_use_gpu: bool) -> dict:
    """What the memory pre-flight compares against: the sweep's setting, or the cluster's."""
    if sweep.memory_per_worker_gb:
        return {"per_worker": int(sweep.memory_per_worker_gb * 1024**3)}
    return measured(may_use_gpu)


def prepare_base_data(sweep: SweepConfig, base: Config, dims: list[Dimension], log) -> dict:
    """Prepare the base config's data once, where `llm-ray prepare` would put it, unless the
    space searches data settings (then each variant is prepared by the first trial needing it)."""
    searched = [d.path for d in dims if d.path.split(".")[0] in DATA_SECTIONS]
    if not searched:
        prepare(base, log=log)
    else:
        log(f"tune: the space searches data settings ({', '.join(searched)}): each variant is prepared once")
    # Absolute: trials run in Ray's worker folders, where a relative output_dir means elsewhere.
    return {"variant": data_variant(base), "path": data_dir(base).uri,
            "output_dir": Location.parse(base.output_dir).uri, "name": base.name}


def check_resume(folder: Location, sweep: SweepConfig, resume: bool) -> None:
    """--resume needs the same sweep; a new start must not overwrite an earlier sweep's results."""
    from ray import tune

    saved = folder / "sweep.yaml"
    path, filesystem = tune_storage(folder)
    exists = tune.Tuner.can_restore(path, storage_filesystem=filesystem)
    current = sweep.model_dump(mode="json")
    if resume:
        if not exists:
            raise ConfigError(f"--resume: there is no sweep to continue at {folder}")
        previous = yaml.safe_load(saved.read_text()) if saved.is_file() else None
        if previous != current:
            raise ConfigError(f"--resume: {folder / 'sweep.yaml'} differs from the sweep file given; a sweep "
                              "continues with the search it started (rename the sweep to start a new one)")
    elif exists:
        raise ConfigError(f"sweep {sweep.name!r} already ran at {folder}: add --resume to continue it, or "
                          "give the sweep another name")
    folder.mkdir()
    saved.write_text(yaml.safe_dump(current, sort_keys=False))


def run_sweep(sweep: SweepConfig, sweep_folder: Path, resume: bool = False, log=print) -> dict:
    """Run (or continue) the sweep; write its results; return the summary (see sweep.results)."""
    from ray import tune

    tree = base_tree(sweep, sweep_folder)
    base = validate(tree)
    dims = sweep.dimensions()
    folder = sweep_dir(sweep, base)
    scheduler = make_scheduler(sweep, base)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", SNAPSHOT_SECONDS)
    init_ray()
    check_sweep_storage(folder, sweep, base)
    check_resume(folder, sweep, resume)
    may_use_gpu = base.train.use_gpu or any(d.path == "train.use_gpu" for d in dims)
    plan = {
        "sweep": sweep.name, "objective": sweep.objective, "base_tree": tree, "sweep_dir": folder.uri,
        "trials_dir": (folder / "trials").uri, "s3": S3Settings.of(base.data.s3),
        "concurrent_trials": sweep.search.max_concurrent_trials,
        "memory": cluster_memory(sweep, may_use_gpu), "base_data": prepare_base_data(sweep, base, dims, log),
    }
    # The trial function only coordinates (its workers reserve their own CPUs and GPUs): a token
    # reservation, as Tune refuses an empty one.
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": 0.01})
    experiment, filesystem = tune_storage(folder)
    if resume:
        log(f"tune: continuing the sweep at {folder / EXPERIMENT}")
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                                   storage_filesystem=filesystem)
    else:
        s = sweep.search
        log(f"tune: sweep {sweep.name}: {s.algorithm} search, "
            f"{f'the grid {s.trials} time(s)' if s.algorithm == 'grid' else f'{s.trials} trial(s)'}, "
            f"{s.max_concurrent_trials} at a time, scheduler {sweep.scheduler.kind}")
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(dims, grid=s.algorithm == "grid"),
            tune_config=tune.TuneConfig(search_alg=make_searcher(sweep), scheduler=scheduler,
                                        num_samples=s.trials, max_concurrent_trials=s.max_concurrent_trials,
                                        metric=sweep.objective, mode="min", reuse_actors=False),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=folder.path, storage_filesystem=filesystem,
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                      verbose=1),
        )
    tuner.fit()  # Ctrl-C stops the trials and saves the experiment; the results so far follow
    summary = summarize(sweep, folder, dims)
    write_results(summary, sweep, base, folder, log)
    unfinished = [r["trial"] for r in summary["rows"] if r["status"] in ("pending", "running", "paused")]
    if unfinished or len(summary["rows"]) < expected_trials(sweep, dims):
        log(f"tune: the sweep stopped before all its trials ran; continue it with "
            f"`llm-ray tune --sweep <file> --resume`")
    return summary


def expected_trials(sweep: SweepConfig, dims: list[Dimension]) -> int:
    if sweep.search.algorithm != "grid":
        return sweep.search.trials
    combinations = 1
    for d in dims:
        combinations *= len(d.values)
    return combinations * sweep.search.trials
