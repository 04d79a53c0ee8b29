"""Sweep options that need no training to observe: the scheduler's fidelity, grace period and
reduction factor, concurrent trials, startup trials, seed and output folder. The trainable here
is a stand-in reporting a known curve; the real trial is tested in test_tune.py."""

import json
import time

import pytest

from llm_ray.config import load_config
from llm_ray.config.sweep import SweepConfig
from llm_ray.sweep.runner import make_sampler, make_scheduler, make_searcher, sweep_dir, tune_space


def sweep_of(**fields) -> SweepConfig:
    return SweepConfig.model_validate({"name": "toy", "space": {"train.lr": "choice([1.0, 2.0, 3.0, 4.0])"},
                                       **fields})


def run_toy(sweep: SweepConfig, tmp_path, steps: int = 8) -> dict:
    """Each trial reports val_loss = lr + 1/step at every step, with step and tokens (512 per
    step); returns {lr: (last step reported, start, end)}."""
    from ray import tune

    base = load_config("debug", [f"train.max_steps={steps}", "train.total_batch_tokens=512",
                                 "train.num_workers=1"])
    log = tmp_path / "spans"
    log.mkdir()

    def toy(config):
        began = time.time()
        step = 0
        for step in range(1, steps + 1):
            time.sleep(0.3)
            # Recorded before reporting: a trial the scheduler stops ends inside report().
            (log / f"{config['train.lr']}.json").write_text(json.dumps([step, began, time.time()]))
            tune.report({"step": step, "tokens": 512 * step, "val_loss": config["train.lr"] + 1 / step})

    tuner = tune.Tuner(
        tune.with_resources(toy, {"CPU": 0.01}),
        param_space=tune_space(sweep.dimensions(), grid=sweep.search.algorithm == "grid"),
        tune_config=tune.TuneConfig(search_alg=make_searcher(sweep), scheduler=make_scheduler(sweep, base),
                                    num_samples=sweep.search.trials,
                                    max_concurrent_trials=sweep.search.max_concurrent_trials,
                                    metric="val_loss", mode="min"),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0),
    )
    tuner.fit()
    return {float(p.stem): json.loads(p.read_text()) for p in log.glob("*.json")}


@pytest.mark.integration
def test_asha_on_tokens_stops_at_its_rungs_and_concurrency_is_capped(ray_session, tmp_path):
    """Grid in order lr 1, 2, 3, 4 (best first), two at a time. ASHA on tokens with a grace
    period of 1024 tokens (2 steps) and reduction factor 2: rungs at 1024 and 2048 tokens; lr 3
    and 4 trail the trials before them and stop at the first rung they lose at."""
    sweep = sweep_of(search={"algorithm": "grid", "max_concurrent_trials": 2},
                     scheduler={"kind": "asha", "time_attr": "tokens", "grace_period": 1024, "reduction_factor": 2})
    spans = run_toy(sweep, tmp_path)
    assert spans[1.0][0] == 8  # the best runs to the end
    assert spans[4.0][0] in (2, 4)  # stopped at a rung: 1024 or 2048 tokens
    assert sum(1 for lr in spans if spans[lr][0] < 8) >= 1
    # Never more than two trials at once: at each trial's start, at most one other is running.
    for lr, (_, start, _) in spans.items():
        overlapping = [o for o, (_, s, e) in spans.items() if o != lr and s <= start < e]
        assert len(overlapping) <= 1, (lr, overlapping)


@pytest.mark.integration
def test_without_a_scheduler_every_trial_runs_to_the_end(ray_session, tmp_path):
    spans = run_toy(sweep_of(search={"algorithm": "grid", "max_concurrent_trials": 4}), tmp_path, steps=4)
    assert {lr: s[0] for lr, s in spans.items()} == {1.0: 4, 2.0: 4, 3.0: 4, 4.0: 4}
    starts = sorted(s[1] for s in spans.values())
    assert starts[-1] < min(s[2] for s in spans.values())  # four at once: all started before any ended


@pytest.mark.parametrize("algorithm", ["bayes", "tpe"])
def test_startup_trials_are_random_search_then_the_model_takes_over(algorithm):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distribution = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}

    def proposals(sampler, n=6):
        study = optuna.create_study(sampler=sampler)
        xs = []
        for _ in range(n):
            trial = study.ask(distribution)
            xs.append(trial.params["x"])
            study.tell(trial, (trial.params["x"] - 0.3) ** 2)
        return xs

    random = proposals(optuna.samplers.RandomSampler(seed=5))
    for startup in (2, 4):
        modelled = proposals(make_sampler(algorithm, 5, startup))
        assert modelled[:startup] == random[:startup]  # the same seeded random draws first
        assert modelled[startup] != random[startup]  # then the model's proposal
    assert proposals(make_sampler(algorithm, 5, 2)) != proposals(make_sampler(algorithm, 6, 2))  # seed


def test_the_sweep_folder_follows_output_dir(tmp_path):
    from llm_ray.storage import S3Settings

    base = load_config("debug", [f"output_dir={tmp_path / 'base'}"])
    assert sweep_dir(sweep_of(), base).local() == (tmp_path / "base" / "toy").resolve()
    assert sweep_dir(sweep_of(output_dir=str(tmp_path / "elsewhere")), base).local() == tmp_path / "elsewhere" / "toy"
    on_s3 = sweep_dir(sweep_of(output_dir="s3://bucket/sweeps/"), base)  # trials on every node reach it
    assert on_s3.uri == "s3://bucket/sweeps/toy" and on_s3.s3 == S3Settings.of(base.data.s3)


def test_the_base_data_folder_is_absolute_for_trials_running_in_other_folders(tmp_path, monkeypatch):
    """Trials run in Ray's worker folders: a relative output_dir there would prepare the data again
    somewhere else."""
    from pathlib import Path

    from llm_ray.sweep.runner import prepare_base_data

    monkeypatch.chdir(tmp_path)
    sweep = sweep_of(space={"tokenizer.vocab_size": "choice([256, 512])"})  # data searched: nothing prepared here
    data = prepare_base_data(sweep, load_config("debug", ["output_dir=runs"]), sweep.dimensions(), lambda *_: None)
    assert data["output_dir"] == str(tmp_path / "runs") and Path(data["path"]) == tmp_path / "runs" / "debug" / "data"
