"""Sweep files, trial configs and the memory estimate: plain Python, no Ray."""

from pathlib import Path

import pytest
import yaml

from llm_ray.config import ConfigError, load_config
from llm_ray.config.sweep import Dimension, load_sweep, parse_dimension
from llm_ray.sweep.memory import GIB, estimate_memory
from llm_ray.sweep.trial import InvalidTrial, SkippedTrial, check_trial, trial_config, worker_budget

TUNING = Path(__file__).parent.parent / "tuning"


def write_sweep(tmp_path: Path, **fields) -> Path:
    tree = {"name": "s", "base": "debug", "space": {"train.lr": "loguniform(1e-4, 3e-2)"}, **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["debug", "demo", "gpt2-124m"])
def test_the_ready_sweeps_load_and_their_base_configs_validate(name):
    from llm_ray.sweep.runner import base_tree

    sweep, folder = load_sweep(TUNING / f"{name}.yaml")
    assert sweep.dimensions()
    base_tree(sweep, folder)  # raises on an invalid base or override


def test_search_expressions():
    assert parse_dimension("train.lr", "loguniform(1e-4, 3e-2)") == Dimension("train.lr", "loguniform", 1e-4, 3e-2)
    assert parse_dimension("train.warmup_steps", "randint(0, 40)") == Dimension("train.warmup_steps", "randint", 0, 40)
    d = parse_dimension("train.optimizer", "choice([adamw, sgd])")
    assert d.kind == "choice" and d.values == ("adamw", "sgd")
    assert parse_dimension("train.lr", "choice([1e-3, 3e-3])").values == (1e-3, 3e-3)  # numbers, not text
    assert parse_dimension("train.compile", "choice([true, false])").values == (True, False)


@pytest.mark.parametrize("path, expression, message", [
    ("train.lrr", "uniform(0, 1)", "space.train.lrr: train.lrr is not a config field; allowed here: "),
    ("train", "uniform(0, 1)", "space.train: is a section"),
    ("train.lr", "normal(0, 1)", "unknown function 'normal'"),
    ("train.lr", "uniform(1, 0)", "low (1.0) must be below high (0.0)"),
    ("train.lr", "loguniform(0, 1)", "needs a positive low end"),
    ("train.max_steps", "randint(1.5, 4)", "takes whole numbers"),
    ("train.lr", "choice([])", "choice takes one non-empty list"),
    ("train.lr", "choice([1, 1])", "lists a value twice"),
    ("train.lr", "0.1", "is not a search expression"),
    ("name", "choice([a, b])", "set by the sweep for every trial"),
])
def test_bad_search_expressions_name_the_parameter(path, expression, message):
    with pytest.raises(ConfigError, match="space.") as e:
        parse_dimension(path, expression)
    assert message in str(e.value)


def test_sweep_file_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"searchh: unknown field; allowed here: .*search"):
        load_sweep(write_sweep(tmp_path, searchh={}))
    with pytest.raises(ConfigError, match=r"search.algorithm: allowed: 'bayes', 'tpe', 'random' or 'grid'"):
        load_sweep(write_sweep(tmp_path, search={"algorithm": "annealing"}))
    with pytest.raises(ConfigError, match="grid needs choice.*train.lr is a range"):
        load_sweep(write_sweep(tmp_path, search={"algorithm": "grid"}))
    with pytest.raises(ConfigError, match="asha compares the validation loss"):
        load_sweep(write_sweep(tmp_path, objective="bits_per_byte", scheduler={"kind": "asha"}))
    with pytest.raises(ConfigError, match="space.model.n_layers: model.n_layers is not a config field"):
        load_sweep(write_sweep(tmp_path, space={"model.n_layers": "choice([2, 4])"}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_a_base_with_a_bad_override_is_a_config_error(tmp_path):
    from llm_ray.sweep.runner import base_tree

    sweep, folder = load_sweep(write_sweep(tmp_path, overrides=["train.max_steps=0"]))
    with pytest.raises(ConfigError, match=r"base config \(debug with its overrides\)(.|\n)*train.max_steps"):
        base_tree(sweep, folder)


def plan_for(**memory):
    return {"base_tree": {"name": "debug-base", "output_dir": "/tmp/x", "data": {"block_size": 64}, "tokenizer":
                          {"vocab_size": 512}, "model": {"context_length": 64, "n_layer": 2, "n_head": 2, "n_embd": 64},
                          "train": {"num_workers": 1, "total_batch_tokens": 512}},
            "trials_dir": "/tmp/x/s/trials", "sweep": "s", "concurrent_trials": 1, "memory": memory}


def test_trial_config_merges_the_values_and_names_the_trial():
    cfg = trial_config(plan_for(), {"train.lr": 0.01, "model.n_layer": 3}, "abc_00001")
    assert cfg.train.lr == 0.01 and cfg.model.n_layer == 3 and cfg.model.n_embd == 64
    assert cfg.name == "trial-abc_00001" and cfg.output_dir == "/tmp/x/s/trials" and cfg.tracking.group == "s"


def test_an_invalid_combination_fails_its_trial_with_the_reason(tmp_path):
    plan = {**plan_for(per_worker=4 * GIB), "trials_dir": str(tmp_path)}
    with pytest.raises(InvalidTrial, match=r"invalid combination: model.n_head: must divide n_embd \(63\)"):
        check_trial(plan, {"model.n_embd": 63}, "t_00000")
    record = yaml.safe_load((tmp_path / "trial-t_00000" / "trial.json").read_text())
    assert record["status"] == "invalid" and "n_head" in record["reason"]


def test_a_trial_over_the_memory_budget_is_skipped_with_its_estimate(tmp_path):
    plan = {**plan_for(per_worker=2 * GIB), "trials_dir": str(tmp_path)}
    cfg, record = check_trial(plan, {"model.n_embd": 64}, "t_00000")
    assert record["memory_estimate_gib"] < 2
    with pytest.raises(SkippedTrial, match=r"needs about .* GiB per worker .*M parameters.*a worker has 2.00 GiB"):
        check_trial(plan, {"model.n_embd": 2048}, "t_00001")
    record = yaml.safe_load((tmp_path / "trial-t_00001" / "trial.json").read_text())
    assert record["status"] == "skipped" and record["memory_estimate_gib"] > 2


def test_the_worker_budget_shares_a_node_between_the_workers_it_can_hold():
    cfg = trial_config(plan_for(), {"train.num_workers": 2, "train.total_batch_tokens": 1024,
                                    "train.cpus_per_worker": 0.5}, "t")
    assert worker_budget(plan_for(per_worker=3 * GIB), cfg) == 3 * GIB
    assert worker_budget(plan_for(node=16 * GIB, node_cpus=2), cfg) == 8 * GIB  # 2 workers
    plan = {**plan_for(node=16 * GIB, node_cpus=2), "concurrent_trials": 4}
    assert worker_budget(plan, cfg) == 4 * GIB  # 8 workers wanted, 4 fit on 2 CPUs at 0.5 each
    gpu = trial_config(plan_for(), {"train.use_gpu": True}, "t")
    assert worker_budget(plan_for(gpu=80 * GIB, node=16 * GIB, node_cpus=2), gpu) == 80 * GIB


def test_the_estimate_follows_zero_stage_precision_checkpointing_and_offload():
    def estimate(*overrides):
        return estimate_memory(load_config("debug", ["model.n_embd=256", "model.n_head=4", "model.n_layer=8",
                                                     *overrides]))

    z0, z1, z2, z3 = (estimate(f"train.zero_stage={s}") for s in range(4))  # 2 workers
    assert z0.parameters == z3.parameters > 1_000_000
    assert z0.optimizer == 2 * z1.optimizer and z1.gradients == 2 * z2.gradients and z2.weights == 2 * z3.weights
    # Partitioning shrinks what each worker holds; ZeRO-2/3's reduction buckets (2 x 5e6 fp32 elements at least,
    # of which a CPU worker's memory holds one per parameter) come on top.
    assert z0.buckets == z1.buckets == 0 and z2.buckets == z3.buckets == 2 * min(5 * 10**6, z0.parameters) * 4
    assert z0.total > z1.total > z2.total - z2.buckets > z3.total - z3.buckets
    assert estimate("train.zero_stage=2", "train.use_gpu=true").buckets == 2 * 5 * 10**6 * 4  # allocated whole
    plain, checkpointed = estimate(), estimate("train.activation_checkpointing=true")
    assert checkpointed.activations < plain.activations / 2
    assert estimate("train.micro_batch_size=16", "train.total_batch_tokens=2048").activations > 1.9 * plain.activations
    assert estimate("train.precision=bf16").weights == plain.weights // 2
    gpu = estimate("train.use_gpu=true", "train.offload_optimizer=true")
    assert gpu.offloaded == gpu.optimizer and gpu.total < estimate("train.use_gpu=true").total
    assert estimate("train.offload_optimizer=true").offloaded == 0  # a CPU worker's host memory is its memory


def test_tune_space_includes_both_ends_of_integer_ranges_and_grids_choices():
    from ray import tune

    from llm_ray.sweep.runner import tune_space

    dims = [parse_dimension("train.warmup_steps", "randint(0, 2)"), parse_dimension("train.lr", "loguniform(1e-4, 1e-2)"),
            parse_dimension("model.n_layer", "choice([1, 2])")]
    space = tune_space(dims, grid=False)
    assert {space["train.warmup_steps"].sample() for _ in range(300)} == {0, 1, 2}
    assert all(1e-4 <= space["train.lr"].sample() <= 1e-2 for _ in range(100))
    assert tune_space(dims[2:], grid=True)["model.n_layer"] == tune.grid_search([1, 2])


def test_results_table_csv_and_plots_from_mixed_trial_statuses(tmp_path):
    import csv

    from llm_ray.sweep.results import plot_history, plot_parallel, table, write_csv

    dims = [parse_dimension("train.lr", "loguniform(1e-4, 1e-2)"), parse_dimension("train.optimizer",
                                                                                   "choice([adamw, sgd])")]
    rows = [
        {"trial": "trial-a", "status": "finished", "train.lr": 1e-3, "train.optimizer": "adamw", "val_loss": 5.2,
         "step": 40, "memory_gib": 1.01, "reason": ""},
        {"trial": "trial-b", "status": "stopped early", "train.lr": 1e-4, "train.optimizer": "sgd", "val_loss": 6.1,
         "step": 10, "memory_gib": 1.01, "reason": ""},
        {"trial": "trial-c", "status": "skipped", "train.lr": 5e-3, "train.optimizer": "sgd", "val_loss": None,
         "step": None, "memory_gib": 9.5, "reason": "needs about 9.50 GiB per worker; a worker has 2.00 GiB"},
    ]
    summary = {"rows": rows, "best": rows[0], "objective": "val_loss"}
    text = table(summary, dims).splitlines()
    assert text[0].split() == ["trial", "status", "train.lr", "train.optimizer", "val_loss", "step", "memory_gib",
                               "reason"]
    assert text[1].split()[:5] == ["trial-a", "finished", "0.001", "adamw", "5.2"]
    assert "skipped" in text[3] and "needs about 9.50 GiB" in text[3]
    write_csv(summary, dims, tmp_path / "results.csv")
    with (tmp_path / "results.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["finished", "stopped early", "skipped"]
    plot_history(summary, tmp_path / "history.png")
    plot_parallel(summary, dims, tmp_path / "parallel.png")
    assert (tmp_path / "history.png").stat().st_size > 5000 and (tmp_path / "parallel.png").stat().st_size > 5000
    empty = {"rows": rows[2:], "best": None, "objective": "val_loss"}  # nothing scored yet: still a plot
    plot_history(empty, tmp_path / "h.png")
    plot_parallel(empty, dims, tmp_path / "p.png")
    assert (tmp_path / "h.png").is_file() and (tmp_path / "p.png").is_file()
