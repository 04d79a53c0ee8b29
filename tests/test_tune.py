"""Sweeps of the debug model on the shared local Ray: every searcher, ASHA, data variants,
invalid and over-memory trials, restore after the driver is SIGKILLed, best_config.yaml."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llm_ray.checkpoint import read_train_state
from llm_ray.cli import main
from llm_ray.config import load_config
from llm_ray.config.sweep import load_sweep
from llm_ray.serve.launch import choose_checkpoint
from llm_ray.sweep.runner import run_sweep
from tests.conftest import CORPUS

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.sweep]

TUNING = Path(__file__).parent.parent / "tuning"


@pytest.fixture(scope="module")
def sweeps(ray_session, tmp_path_factory):
    """The folder every sweep of this module writes to: all share one prepared base dataset."""
    return tmp_path_factory.mktemp("sweeps")


def base_overrides(out: Path, max_steps: int = 20) -> list[str]:
    return [f"output_dir={out}", f"data.sources=[{CORPUS}]", "data.max_files=null", "train.num_workers=1",
            "train.cpus_per_worker=0.5", "train.total_batch_tokens=512", f"train.max_steps={max_steps}",
            "train.eval_every=10", f"train.checkpoint_every={max_steps}", "train.warmup_steps=2",
            "train.log_every=10"]


def write_sweep(out: Path, name: str, **fields) -> Path:
    tree = {"name": name, "base": "debug", "overrides": base_overrides(out), **fields}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def rows(folder: Path) -> list[dict]:
    with (folder / "results.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def trial_record(folder: Path, trial: str) -> dict:
    return json.loads((folder / "trials" / trial / "trial.json").read_text(encoding="utf-8"))


def test_bayesian_sweep_of_the_ready_debug_file_promotes_a_config_that_trains(sweeps, capsys):
    """tuning/debug.yaml as shipped (GP search over lr, depth and optimizer, ASHA), shortened to
    3 trials of 20 steps, two at a time, tracked by W&B offline."""
    tree = yaml.safe_load((TUNING / "debug.yaml").read_text())
    tree["overrides"] = base_overrides(sweeps) + ["tracking.backend=wandb", "tracking.wandb_mode=offline"]
    tree["search"].update(num_samples=3, max_concurrent_trials=2, startup_trials=2)
    path = sweeps / "bayes.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    assert main(["tune", "--sweep", str(path)]) == 0
    out = capsys.readouterr().out
    folder = sweeps / tree["name"]

    results = rows(folder)
    assert len(results) == 3 and {r["status"] for r in results} <= {"finished", "stopped early"}
    assert len({(r["train.lr"], r["model.n_layer"], r["train.optimizer"]) for r in results}) == 3
    finished = [r for r in results if r["status"] == "finished"]
    best = min(finished, key=lambda r: float(r["val_loss"]))
    assert f"tune: best {best['trial']}: val_loss {float(best['val_loss']):.4f}" in out
    assert "trial" in out and "status" in out and best["trial"] in out  # the table
    for plot in ("history.png", "parallel.png"):
        assert (folder / plot).stat().st_size > 5000

    # Every trial is a normal training run: its checkpoint holds its config, grouped in W&B by sweep.
    for r in finished:
        state = read_train_state(r["checkpoint"])
        saved = load_config(str(Path(r["checkpoint"]) / "model" / "config.yaml"))
        assert saved.tracking.group == tree["name"] and saved.train.lr == pytest.approx(float(r["train.lr"]))
        assert state["step"] == 20 and state["tracker_run_id"]
        wandb_runs = list((folder / "trials" / r["trial"] / "wandb" / "wandb").glob("offline-run-*"))
        assert len(wandb_runs) == 1
        assert trial_record(folder, r["trial"])["data"] == "reused"  # prepared once, by the sweep

    best_config = load_config(str(folder / "best_config.yaml"))
    assert best_config.train.lr == pytest.approx(float(best["train.lr"]))
    assert best_config.model.n_layer == int(best["model.n_layer"])
    assert best_config.train.optimizer == best["train.optimizer"]
    assert best_config.name == f"{tree['name']}-best" and best_config.output_dir == str(sweeps)
    # `llm-ray serve --sweep NAME` serves the checkpoint with the lowest validation loss: the best trial's.
    served = choose_checkpoint(None, None, tree["name"], str(sweeps), log=lambda *_: None)
    assert Path(served).is_relative_to(folder / "trials" / best["trial"])
    assert read_train_state(served)["history"][-1]["val_loss"] == pytest.approx(float(best["val_loss"]))
    # As is, by the training command: it trains on the data the sweep prepared.
    data = json.loads((folder / "trials" / best["trial"] / "trial.json").read_text())["data_path"]
    capsys.readouterr()
    assert main(["train", "--config", str(folder / "best_config.yaml"), "--data", data]) == 0
    checkpoint = capsys.readouterr().out.split("checkpoint: ")[1].splitlines()[0]
    assert checkpoint.startswith(str(best_config.run_dir)) and read_train_state(checkpoint)["step"] == 20


def test_tpe_sweep_over_tokenizer_sizes_prepares_each_variant_once_and_minimizes_bits_per_byte(sweeps):
    path = write_sweep(sweeps, "tpe-data", objective="bits_per_byte",
                       space={"tokenizer.vocab_size": "choice([384, 448])", "train.lr": "loguniform(1e-3, 1e-2)"},
                       search={"algorithm": "tpe", "num_samples": 3, "max_concurrent_trials": 2, "startup_trials": 2})
    sweep, folder = load_sweep(path)
    summary = run_sweep(sweep, folder, log=lambda *_: None)
    results = summary["rows"]
    assert len(results) == 3 and all(r["status"] == "finished" for r in results)
    assert all(0.5 < r["bits_per_byte"] < 8 for r in results)
    assert summary["best"]["bits_per_byte"] == min(r["bits_per_byte"] for r in results)
    records = [trial_record(sweeps / "tpe-data", r["trial"]) for r in results]
    by_variant = {}
    for r, record in zip(results, records):
        by_variant.setdefault(r["tokenizer.vocab_size"], []).append(record["data"])
        manifest = json.loads((Path(record["data_path"]) / "manifest.json").read_text())
        assert manifest["vocab_size"] <= r["tokenizer.vocab_size"]
        report = json.loads((sweeps / "tpe-data" / "trials" / r["trial"] / "eval" / "eval.json").read_text())
        assert report["bits_per_byte"]["value"] == pytest.approx(r["bits_per_byte"])
    # Neither size is the base's (512, which an earlier sweep of this module may have prepared): each
    # variant a trial used lives in this sweep's folder, prepared by its first trial, reused by the rest.
    # 3 trials over 2 sizes, so at least one trial reuses.
    for vocab, how in by_variant.items():
        assert sorted(how) == ["prepared"] + ["reused"] * (len(how) - 1), (vocab, how)
    assert sorted(len(h) for h in by_variant.values()) == [1, 2], by_variant  # seed 0 draws both sizes


def test_grid_sweep_with_asha_invalid_and_over_memory_trials(sweeps):
    """Grid: 2 learning rates x 3 widths. Width 63 is not divisible by the 2 heads (invalid);
    width 4096 needs several GiB (skipped under a 2 GiB budget). The good learning rate runs
    first; ASHA stops the hopeless one at its first rung."""
    path = write_sweep(sweeps, "grid", space={"model.n_embd": "choice([64, 63, 4096])",
                                              "train.lr": "choice([5.0e-3, 1.0e-5])"},
                       search={"algorithm": "grid", "max_concurrent_trials": 1},
                       scheduler={"kind": "asha", "grace_period": 10, "reduction_factor": 2},
                       memory_per_worker_gb=2)
    tree = yaml.safe_load(path.read_text())
    tree["overrides"] = base_overrides(sweeps, max_steps=30) + ["train.min_lr=1.0e-6"]
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    sweep, folder = load_sweep(path)
    results = run_sweep(sweep, folder, log=lambda *_: None)["rows"]
    status = {(r["model.n_embd"], r["train.lr"]): r for r in results}
    assert len(status) == 6
    for lr in (5e-3, 1e-5):
        assert status[(63, lr)]["status"] == "invalid" and "must divide n_embd (63)" in status[(63, lr)]["reason"]
        skipped = status[(4096, lr)]
        assert skipped["status"] == "skipped" and skipped["memory_gib"] > 2
        assert "a worker has 2.00 GiB" in skipped["reason"]
        assert not (sweeps / "grid" / "trials" / skipped["trial"] / "checkpoints").exists()  # never launched
    good, bad = status[(64, 5e-3)], status[(64, 1e-5)]
    assert good["status"] == "finished" and good["step"] == 30
    assert bad["status"] == "stopped early" and bad["step"] < 30 and bad["val_loss"] > good["val_loss"]


def tune_driver(sweep: Path, *args: str) -> subprocess.Popen:
    """`llm-ray tune` as its own driver process, joined to this session's Ray."""
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    return subprocess.Popen([sys.executable, "-m", "llm_ray.cli", "tune", "--sweep", str(sweep), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def checkpoint_steps(trial_dir: Path) -> list[int]:
    return sorted(read_train_state(p)["step"] for p in trial_dir.glob("checkpoints/*/checkpoint_*")
                  if (p / "_manifest").is_dir())


def test_random_sweep_continues_after_its_driver_is_killed(sweeps):
    """SIGKILL the driver once a trial finished and another saved a mid-run checkpoint;
    --resume keeps the finished one, resumes the other from its checkpoint, and the restored
    searcher continues its sequence (a fresh one, same seed, would repeat the first point)."""
    from llm_ray.sweep.trial import read_status

    path = write_sweep(sweeps, "restore", space={"train.lr": "loguniform(1e-3, 1e-2)"},
                       search={"algorithm": "random", "num_samples": 3, "seed": 3})
    tree = yaml.safe_load(path.read_text())
    tree["overrides"] = base_overrides(sweeps, max_steps=60) + ["train.checkpoint_every=20"]
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    folder = sweeps / "restore"
    driver = tune_driver(path)
    done, interrupted = [], []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            trials = list((folder / "trials").glob("trial-*"))
            done = [d for d in trials if (read_status(d) or {}).get("status") == "finished"]
            interrupted = [d for d in trials if d not in done and checkpoint_steps(d)]
            if done and interrupted:
                break
            time.sleep(0.1)
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    at_kill = {d: checkpoint_steps(d) for d in done + interrupted}
    assert all(at_kill[d][-1] == 60 for d in done) and all(at_kill[d][-1] < 60 for d in interrupted)
    time.sleep(5)  # the killed driver's trial actors and workers go with it

    changed = path.with_name("restore-changed.yaml")  # the same sweep name, another search
    changed.write_text(path.read_text().replace("num_samples: 3", "num_samples: 4"))
    assert main(["tune", "--sweep", str(changed), "--resume"]) == 2
    assert main(["tune", "--sweep", str(path)]) == 2  # no silent restart over the earlier results
    assert main(["tune", "--sweep", str(path), "--resume"]) == 0

    results = rows(folder)
    assert len(results) == 3 and all(r["status"] == "finished" for r in results)
    for d in done:
        assert checkpoint_steps(d) == at_kill[d]  # not rerun
    for d in interrupted:  # resumed from its checkpoint (or one its workers saved as the driver died)
        resumed = read_train_state(trial_record(folder, d.name)["result"]["checkpoint_dir"])
        assert len(resumed["resumed_from"]) == 1 and resumed["resumed_from"][0] >= at_kill[d][-1], resumed
        assert resumed["step"] == 60
    # The restored searcher continued its sequence: the same points, in order, as an uninterrupted
    # random search with this seed (a fresh searcher would have proposed the first point again).
    import optuna

    sampler = optuna.samplers.RandomSampler(seed=3)
    study = optuna.create_study(sampler=sampler)
    expected = []
    for _ in range(3):
        trial = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)})
        expected.append(trial.params["train.lr"])
        study.tell(trial, 1.0)
    assert [float(r["train.lr"]) for r in results] == pytest.approx(expected, rel=1e-12)
