"""Time to a target validation bits per byte: the `speedrun` preset against a nanoGPT-style baseline.

    python benchmarks/speedrun.py [--target 2.3] [--steps N] [--only speedrun|baseline] [--set PATH=VALUE ...]

Both train the same model size on the same prepared split of the demo corpus (the `speedrun` preset's
data and tokenizer: Shakespeare, 4,096 BPE tokens, blocks of 128) with llm-ray's own loop (2 Ray Train
workers, ZeRO-2), in this one run:

  baseline   nanoGPT's recipe: AdamW, GELU MLP, learned absolute positions, LayerNorm with biases, tied
             embeddings, fp32, gradient clipping at 1 (the `speedrun` preset with BASELINE's overrides);
  speedrun   the preset as shipped (llm_ray/presets/speedrun.yaml).

Validation loss is measured every --eval-every steps on the same sample of validation blocks, and turned
into bits per byte with the tokenizer's bytes per token on validation text (the prepare report's). The
time axis is training seconds only (evaluations and checkpoints left out, as both runs have the same
ones). Time to target is interpolated between the evaluations around the crossing. Prints both runs'
throughput, final bits per byte and time to target, their ratio (baseline / speedrun), and draws both
curves to speedrun.png. --set overrides the speedrun run only (to try a variant).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

# nanoGPT's choices, applied over the speedrun preset: what the baseline run changes.
BASELINE = [
    "model.pos_encoding=learned", "model.norm=layernorm", "model.bias=true", "model.mlp=gelu",
    "model.qk_norm=false", "model.logit_softcap=null", "model.tie_embeddings=true",
    "train.optimizer=adamw", "train.precision=fp32", "train.autocast_bf16=false", "train.grad_clip=1.0",
    "train.lr=2.0e-3", "train.min_lr=2.0e-4", "train.schedule=cosine",  # the demo preset's AdamW rates
]


def curve(history: list[dict], bytes_per_token: float) -> list[tuple[float, float]]:
    """(training seconds so far, validation bits per byte) at each evaluation, the untrained one first."""
    points, seconds = [], 0.0
    for row in history:
        seconds += row.get("train_seconds", 0.0)  # progress rows: the training time since the previous one
        if "val_loss" in row:
            points.append((seconds, row["val_loss"] / math.log(2) / bytes_per_token))
    return points


def time_to(target: float, points: list[tuple[float, float]]) -> float | None:
    """Training seconds at which the curve first reaches target, linear between evaluations."""
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if b1 <= target:
            return t1 if b0 <= target else t0 + (t1 - t0) * (b0 - target) / (b0 - b1)
    return None


def plot(curves: dict[str, list[tuple[float, float]]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        ax.plot(*zip(*points[1:]), marker=".", label=label)  # the untrained point would flatten the rest
    ax.axhline(target, color="grey", linestyle="--", label=f"target {target}")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("validation bits per byte")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=2.3, help="validation bits per byte to reach")
    parser.add_argument("--steps", type=int, default=None, help="steps of both runs (default: the preset's)")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between evaluations")
    parser.add_argument("--only", choices=["baseline", "speedrun"], default=None, help="run one of the two")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a field of the speedrun run (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("speedrun.png"), help="where the curves go")
    args = parser.parse_args()

    from llm_ray.config import load_config
    from llm_ray.data.prepare import prepare
    from llm_ray.ray_utils import init_ray
    from llm_ray.train.trainer import train

    workdir = Path(tempfile.mkdtemp(prefix="llmray-speedrun-"))
    common = [f"output_dir={workdir}", f"train.eval_every={args.eval_every}", f"train.log_every={args.eval_every}",
              "train.checkpoint_every=100000"] + ([f"train.max_steps={args.steps}"] if args.steps else [])
    runs = {"baseline": load_config("speedrun", [*common, "name=baseline", *BASELINE]),
            "speedrun": load_config("speedrun", [*common, "name=speedrun", *args.overrides])}
    assert runs["baseline"].data == runs["speedrun"].data and runs["baseline"].model.n_embd == runs["speedrun"].model.n_embd
    init_ray()
    data_cfg = load_config("speedrun", [f"output_dir={workdir}", "name=data"])
    prepare(data_cfg, log=lambda *a: None)
    data = workdir / "data" / "data"
    bytes_per_token = json.loads((data / "prepare_report.json").read_text())["tokenizer"]["bytes_per_token"]

    curves, rows = {}, []
    for label, cfg in runs.items():
        if args.only and label != args.only:
            continue
        print(f"{label}: training {cfg.train.max_steps} steps ...", flush=True)
        history = train(cfg, data, log=lambda *a: None).history
        curves[label] = curve(history, bytes_per_token)
        seconds = sum(h.get("train_seconds", 0.0) for h in history)
        tokens_per_sec = cfg.train.max_steps * cfg.train.total_batch_tokens / seconds
        reached = time_to(args.target, curves[label])
        rows.append((label, tokens_per_sec, curves[label][-1][1], reached, seconds))
        print(f"  {tokens_per_sec:,.0f} tokens/s, {seconds:.0f} s training; final validation "
              f"{curves[label][-1][1]:.3f} bits/byte; target {args.target} "
              + (f"reached after {reached:.0f} s" if reached is not None else "not reached"), flush=True)

    print(f"\n| recipe | tokens/s | final val bits/byte | seconds to {args.target} | training seconds |")
    print("| --- | --- | --- | --- | --- |")
    for label, tps, final, reached, seconds in rows:
        print(f"| {label} | {tps:,.0f} | {final:.3f} | {'-' if reached is None else f'{reached:.0f}'} | {seconds:.0f} |")
    times = {label: reached for label, _, _, reached, _ in rows}
    if len(rows) == 2:
        base, ours = times["baseline"], times["speedrun"]
        if base is not None and ours is not None:
            print(f"\ntime to {args.target} bits/byte: baseline / speedrun = {base / ours:.2f}x (target: at least 1.5x)")
        elif ours is not None:
            seconds = rows[0][4]
            print(f"\nthe baseline did not reach {args.target} in {seconds:.0f} s: speedrun is more than "
                  f"{seconds / ours:.2f}x faster")
        else:
            print(f"\nspeedrun did not reach {args.target}")
    plot(curves, args.target, args.out)
    print(f"curves: {args.out}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
