"""A sweep's results: one row per trial, the best trial's config and checkpoint, two plots.

Rows come from Tune's experiment state (status, searched values, last result) and each trial's
own trial.json (why it was not launched, its memory estimate). Statuses: finished; stopped
early (by ASHA); invalid (its config failed validation); skipped (the memory pre-flight);
failed (training raised); pending or running (the sweep was interrupted).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from llm_ray.config import Config, dump_config
from llm_ray.config.sweep import Dimension, SweepConfig
from llm_ray.storage import Location, local_folder
from llm_ray.sweep.trial import read_status, trial_name, tune_storage, with_values


def _order(trial) -> int:
    """Launch order: Tune's experiment tag starts with the trial's counter ("3_train.lr=...")."""
    head = (trial.experiment_tag or "").split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def _error_line(trial) -> str:
    try:
        text = trial.get_error() or ""  # error.txt from the experiment's storage (S3 too)
    except Exception:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "see the trial's error.txt"


def summarize(sweep: SweepConfig, folder: Location, dims: list[Dimension]) -> dict:
    """{"rows": [...], "best": row or None, "objective": name} from the sweep folder."""
    from ray.tune import ExperimentAnalysis

    path, filesystem = tune_storage(folder)
    analysis = ExperimentAnalysis(path, storage_filesystem=filesystem)
    rows = []
    for trial in sorted(analysis.trials, key=_order):
        record = read_status(folder / "trials" / trial_name(trial.trial_id)) or {}
        last = trial.last_result or {}
        mine = record.get("status")
        reason = record.get("reason", "")
        if trial.status == "ERROR":
            status = mine if mine in ("invalid", "skipped") else "failed"
            reason = reason or _error_line(trial)
        elif trial.status == "TERMINATED":
            status = "finished" if mine == "finished" else "stopped early"
        else:
            status = trial.status.lower()
        value = last.get(sweep.objective)
        rows.append({
            "trial": trial_name(trial.trial_id), "status": status,
            **{d.path: trial.config.get(d.path) for d in dims},
            sweep.objective: value if value is None or math.isfinite(value) else None,
            "step": last.get("step"), "tokens": last.get("tokens"),
            "memory_gib": record.get("memory_estimate_gib"),
            "checkpoint": (record.get("result") or {}).get("checkpoint_dir") or last.get("checkpoint_path"),
            "reason": reason,
        })
    scored = [r for r in rows if r[sweep.objective] is not None]
    finished = [r for r in scored if r["status"] == "finished"] or scored  # stopped early trials ran less
    best = min(finished, key=lambda r: r[sweep.objective]) if finished else None
    return {"rows": rows, "best": best, "objective": sweep.objective}


def best_config(sweep: SweepConfig, base: Config, best: dict, dims: list[Dimension]) -> Config:
    """The winning trial's config, as a fresh run named <sweep>-best in the base's output folder."""
    return with_values(base.model_dump(mode="json"), {d.path: best[d.path] for d in dims}, f"{sweep.name}-best",
                       base.output_dir, sweep.name)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(summary: dict, dims: list[Dimension]) -> str:
    columns = ["trial", "status", *[d.path for d in dims], summary["objective"], "step", "memory_gib", "reason"]
    cells = [[_cell(row.get(c)) for c in columns] for row in summary["rows"]]
    cells = [[c if len(c) <= 70 else c[:67] + "..." for c in line] for line in cells]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(line.rstrip() for line in lines)


def write_csv(summary: dict, dims: list[Dimension], path: Path) -> None:
    columns = ["trial", "status", *[d.path for d in dims], summary["objective"], "step", "tokens", "memory_gib",
               "checkpoint", "reason"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary["rows"])


def plot_history(summary: dict, path: Path) -> None:
    """The objective of each trial in launch order, and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objective = summary["objective"]
    points = [(i + 1, r[objective], r["status"]) for i, r in enumerate(summary["rows"]) if r[objective] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        xs, ys, statuses = zip(*points)
        colors = ["tab:blue" if s == "finished" else "tab:gray" for s in statuses]
        ax.scatter(xs, ys, c=colors, zorder=3, label="trial (gray: stopped early, at fewer steps)")
        best, running = [], math.inf
        for y, status in zip(ys, statuses):  # an early-stopped value is not comparable with a finished one
            running = min(running, y) if status == "finished" else running
            best.append(running)
        if any(math.isfinite(b) for b in best):
            ax.step(xs, best, where="post", color="tab:orange", label="best finished so far")
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_parallel(summary: dict, dims: list[Dimension], path: Path) -> None:
    """Parallel coordinates: one line per scored trial across the searched parameters (scaled to
    their range; log ranges on a log scale; choices by position), colored by the objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objective = summary["objective"]
    rows = [r for r in summary["rows"] if r[objective] is not None]

    def position(d: Dimension, value) -> float:
        if d.kind == "choice":
            index = next((i for i, v in enumerate(d.values) if v == value), 0)
            return index / max(1, len(d.values) - 1)
        low, high, x = float(d.low), float(d.high), float(value)
        if d.kind.startswith("log"):
            low, high, x = math.log(low), math.log(high), math.log(x)
        return (x - low) / (high - low)

    fig, ax = plt.subplots(figsize=(max(5, 2 * len(dims) + 2), 4))
    if rows:
        values = [r[objective] for r in rows]
        low, high = min(values), max(values)
        cmap = plt.get_cmap("viridis")  # the lowest objective darkest
        for r in rows:
            shade = (r[objective] - low) / (high - low) if high > low else 0.0
            ax.plot(range(len(dims)), [position(d, r[d.path]) for d in dims], color=cmap(shade), marker="o",
                    alpha=0.8)
        scale = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(low, high))
        fig.colorbar(scale, ax=ax, label=objective)
    ax.set_xticks(range(len(dims)), [d.path for d in dims], rotation=15)
    ax.set_yticks([0, 1], ["low", "high"])
    ax.set_title("searched values by trial (darker: better)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_results(summary: dict, sweep: SweepConfig, base: Config, folder: Location, log=print) -> None:
    """results.csv, the plots and best_config.yaml in the sweep folder (written here, then uploaded to S3)."""
    dims = sweep.dimensions()
    best = summary["best"]
    with local_folder(folder) as out:
        write_csv(summary, dims, out / "results.csv")
        plot_history(summary, out / "history.png")
        plot_parallel(summary, dims, out / "parallel.png")
        if best is not None:
            dump_config(best_config(sweep, base, best, dims), out / "best_config.yaml")
    log(table(summary, dims))
    if best is None:
        log(f"tune: no trial reported {summary['objective']}; see {folder / 'results.csv'}")
        return
    summary["best_config"] = str(folder / "best_config.yaml")
    log(f"tune: best {best['trial']}: {summary['objective']} {best[summary['objective']]:.4f}")
    log(f"tune: best checkpoint: {best['checkpoint']}")
    log(f"tune: best config: {folder / 'best_config.yaml'} (llm-ray train --config {folder / 'best_config.yaml'})")
    log(f"tune: results.csv, history.png and parallel.png in {folder}")
