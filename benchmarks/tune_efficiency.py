"""Sample efficiency of `llm-ray tune`'s searchers: Bayesian (GP) vs TPE vs random, equal budget.

    python benchmarks/tune_efficiency.py [--seeds 5] [--trials 20] [--steps 30]

The objective is a declared cheap proxy: the validation loss of the `debug` model after --steps
optimizer steps of llm-ray's own training loop (``run_training`` on a real DeepSpeed engine, one
worker, in this process) on the debug preset's prepared data. The space mixes a log-scale
float, integers and a category, like a real sweep:

    train.lr: loguniform(1e-4, 1e-1)   train.warmup_steps: randint(0, 10)
    model.n_layer: randint(1, 4)       train.optimizer: choice([adamw, sgd])

Each searcher is the Optuna sampler `llm-ray tune` builds (``sweep.runner.make_sampler``, 3
startup trials), driven directly by Optuna (no Ray Tune around it: this measures the search,
not Tune's overhead). Every (searcher, seed) run gets the same budget of --trials.

Prints, per searcher: the mean best objective after 5, 10 and --trials trials; and how many
trials it needed, on average over seeds, to reach random search's final best of the same seed
(a run that never reaches it counts as --trials + 1). The ratio against random search is the
figure of merit (target: GP in half or fewer). Saves the mean best-so-far curves as
tune_efficiency.png next to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SPACE = {
    "train.lr": "loguniform(1e-4, 1e-1)",
    "model.n_layer": "randint(1, 4)",
    "train.warmup_steps": "randint(0, 10)",
    "train.optimizer": "choice([adamw, sgd])",
}
SEARCHERS = ("bayes", "tpe", "random")


def prepared_data(out: Path) -> tuple[list[str], list[str]]:
    """The debug preset's packed train and validation shards (prepared once, with a local Ray)."""
    from llm_ray.config import load_config
    from llm_ray.data.pack import load_manifest
    from llm_ray.data.prepare import data_dir, prepare
    from llm_ray.ray_utils import init_ray

    cfg = load_config("debug", [f"output_dir={out}"])
    path = data_dir(cfg)
    if not (path / "manifest.json").is_file():
        import ray

        init_ray(num_cpus=2)
        prepare(cfg, log=lambda *_: None)
        ray.shutdown()
    manifest = load_manifest(path)
    return tuple([str(path / s["file"]) for s in manifest["splits"][split]["shards"]] for split in ("train", "val"))


def make_objective(shards, steps: int):
    import torch

    from llm_ray.config import apply_override, load_config, model_spec, validate
    from llm_ray.model import GPT
    from llm_ray.train.data import BlockOrder, MicroBatches, PackedBlocks, validation_batches
    from llm_ray.train.engine import build_engine
    from llm_ray.checkpoint import TrainState
    from llm_ray.train.loop import run_training

    base = load_config("debug", ["train.num_workers=1", "train.total_batch_tokens=512", f"train.max_steps={steps}",
                                 f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.min_lr=0"])
    train_shards, val_shards = shards

    def objective(values: dict) -> float:
        tree = base.model_dump(mode="json")
        for path, value in values.items():
            apply_override(tree, f"{path}={json.dumps(value)}")
        cfg = validate(tree)
        torch.manual_seed(cfg.seed)
        engine = build_engine(GPT(model_spec(cfg)), cfg)
        micro = cfg.train.micro_batch_size
        blocks = PackedBlocks(train_shards)
        batches = MicroBatches(blocks, BlockOrder(len(blocks), cfg.seed), 0, 0, 1, micro)
        val = [(torch.from_numpy(b), w) for b, w in
               validation_batches(PackedBlocks(val_shards), cfg.train.eval_batches * micro, cfg.seed, 0, 1, micro)]
        state = run_training(cfg, engine, batches, val, TrainState(world_size=1), lambda s, m: None,
                             lambda m: None, 0, torch.device("cpu"), log=lambda line: None)
        loss = [h["val_loss"] for h in state.history if "val_loss" in h][-1]
        return loss if np.isfinite(loss) else 20.0  # a diverged run: worse than any trained model

    return objective


def suggest(trial, dim):
    if dim.kind == "choice":
        return trial.suggest_categorical(dim.path, list(dim.values))
    if dim.kind in ("uniform", "loguniform"):
        return trial.suggest_float(dim.path, dim.low, dim.high, log=dim.kind == "loguniform")
    return trial.suggest_int(dim.path, dim.low, dim.high, log=dim.kind == "lograndint")


def search(algorithm: str, seed: int, trials: int, objective, dims) -> list[float]:
    """Objective values in trial order, for one searcher and seed."""
    import optuna

    from llm_ray.sweep.runner import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=make_sampler(algorithm, seed, startup_trials=3), direction="minimize")
    study.optimize(lambda t: objective({d.path: suggest(t, d) for d in dims}), n_trials=trials)
    return [t.value for t in study.trials]


def best_so_far(values: list[float]) -> np.ndarray:
    return np.minimum.accumulate(np.asarray(values))


def trials_to_reach(curve: np.ndarray, target: float) -> int:
    hits = np.nonzero(curve <= target + 1e-12)[0]
    return int(hits[0]) + 1 if len(hits) else len(curve) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per objective evaluation")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="data and plot folder")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from llm_ray.config.sweep import parse_dimension

    dims = [parse_dimension(path, expr) for path, expr in SPACE.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    shards = prepared_data(args.out.resolve())
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    store = tempfile.mkdtemp()
    dist.init_process_group("gloo", store=dist.FileStore(f"{store}/store", 1), rank=0, world_size=1)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    objective = make_objective(shards, args.steps)

    curves: dict[str, list[np.ndarray]] = {a: [] for a in SEARCHERS}
    started = time.time()
    for seed in range(args.seeds):
        for algorithm in SEARCHERS:
            t0 = time.time()
            values = search(algorithm, seed, args.trials, objective, dims)
            curves[algorithm].append(best_so_far(values))
            print(f"seed {seed} {algorithm:>6}: best {min(values):.4f} ({time.time() - t0:.0f}s)", flush=True)

    targets = [c[-1] for c in curves["random"]]  # random search's final best, per seed
    needed = {a: [trials_to_reach(c, t) for c, t in zip(curves[a], targets)] for a in SEARCHERS}
    marks = sorted({m for m in (5, 10, args.trials) if m <= args.trials})
    print(f"\n{args.seeds} seeds x {args.trials} trials per searcher; objective: val_loss of the debug model "
          f"after {args.steps} steps ({time.time() - started:.0f}s in all)")
    header = "".join(f"  best@{m:<3}" for m in marks)
    print(f"{'searcher':<9}{header}  trials to reach random's final best (mean, per seed)  vs random")
    for a in SEARCHERS:
        bests = "".join(f"  {np.mean([c[m - 1] for c in curves[a]]):<8.4f}" for m in marks)
        ratio = np.mean(needed[a]) / np.mean(needed["random"])
        print(f"{a:<9}{bests}  {np.mean(needed[a]):5.1f}  {needed[a]}  {ratio:.2f}x")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for a in SEARCHERS:
        ax.plot(range(1, args.trials + 1), np.mean(curves[a], axis=0), label=a)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"best val_loss so far (mean of {args.seeds} seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "tune_efficiency.png", dpi=90)
    print(f"curves: {args.out / 'tune_efficiency.png'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
