"""The `llm-ray` command: prepare, train, generate, eval, export, explain, cv, tune, serve, pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm_ray.config import PRESETS, ConfigError, dump_config, load_config
from llm_ray.ray_utils import Terminated

EXIT_USAGE = 2  # bad config or arguments
EXIT_FAILURE = 1  # the run itself failed
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM)


def _add_config_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--config", default=default, metavar="NAME|FILE",
                   help=f"preset ({', '.join(PRESETS)}) or a YAML file (default: {default})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override one field by dotted path, e.g. --set model.n_layer=6 (repeatable; "
                        "values are parsed as YAML: 6, 0.1, true, [a, b])")


def _add_checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, type=Path, metavar="DIR",
                   help="checkpoint folder (or its model/ subfolder)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-ray",
        description="Build a GPT-style language model on Ray: prepare data, train with DeepSpeed, sample.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="read a corpus, train a BPE tokenizer, write packed token shards",
                       description="Read the corpus with Ray Data, hold out validation documents, train a "
                                   "byte-level BPE tokenizer and write packed blocks to <output_dir>/<name>/data.")
    _add_config_args(p, "demo")

    p = sub.add_parser("train", help="train on prepared data with Ray Train and DeepSpeed",
                       description="Train the model with Ray Train workers running DeepSpeed ZeRO; checkpoints "
                                   "go to <output_dir>/<name>/checkpoints or train.storage_path (s3:// too). "
                                   "Rerunning the same name resumes.")
    _add_config_args(p, "demo")
    p.add_argument("--data", default=None, metavar="DIR|URI",
                   help="prepared data folder or s3:// URI (default: <output_dir>/<name>/data)")

    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint",
                       description="Load a checkpoint's safetensors weights and print a continuation.")
    _add_checkpoint_arg(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default: 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 disables (default: 50)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 disables (default: 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")

    p = sub.add_parser("eval", help="score a checkpoint on held-out documents: loss, perplexity, bits per byte, "
                       "BLEU/ROUGE, contamination",
                       description="Score a checkpoint on the held-out split of the data it was trained on (or on "
                                   "--eval-data) with bootstrap intervals, continue held-out documents for BLEU and "
                                   "ROUGE, check n-gram contamination, and write eval.json, eval.md and eval.png "
                                   "into <run>/eval.")
    _add_checkpoint_arg(p)
    p.add_argument("--split", choices=("auto", "val", "test"), default=None,
                   help="held-out split (default: eval.split, auto = test when there is one, else val)")
    p.add_argument("--data", default=None, metavar="DIR|URI",
                   help="prepared data folder or s3:// URI (default: the checkpoint's run's data)")
    p.add_argument("--eval-data", default=None, metavar="PATH",
                   help="score these files or folder instead (any prepare format: .txt, .jsonl, .parquet, gzip)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML file whose fields override the checkpoint's config (e.g. an eval: section)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a field of the checkpoint's config, e.g. --set eval.stride=64 (repeatable)")

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder",
                       description="Write the checkpoint's weights, config and tokenizer as a folder that "
                                   "transformers' AutoModelForCausalLM and AutoTokenizer load: GPT-2 for learned "
                                   "positions, LayerNorm and GELU; Llama for RoPE, RMSNorm and SwiGLU.")
    _add_checkpoint_arg(p)
    p.add_argument("--format", choices=("hf",), default="hf", help="export format (default: hf, Hugging Face)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write")

    p = sub.add_parser("explain", help="attention maps and token attributions for the next-token prediction",
                       description="Write attention heatmaps per layer and head, and attributions of the predicted "
                                   "next token to each input token (gradient x input, integrated gradients, "
                                   "KernelSHAP, LIME; Captum) with their rank agreement, into <run>/explain/<slug>/.")
    _add_checkpoint_arg(p)
    p.add_argument("--text", required=True, help="the input text; its next token is explained")
    p.add_argument("--target", default=None,
                   help="explain this next token (its first token) instead of the most likely one")
    p.add_argument("--samples", type=int, default=200, help="perturbation samples for KernelSHAP and LIME")

    p = sub.add_parser("cv", help="k-fold cross-validation over document clusters",
                       description="Prepare the corpus, deal its documents (outside the test split) into k folds by "
                                   "duplicate cluster, train one model per fold (concurrently when the cluster has "
                                   "room), score each on its fold, and write <run>/cv/cv.json and cv.md.")
    _add_config_args(p, "debug")
    p.add_argument("--folds", type=int, default=3, help="number of folds (default: 3)")

    p = sub.add_parser("tune", help="hyperparameter search with Ray Tune (Bayesian by default)",
                       description="Run the sweep a sweep file describes (see tuning/): every trial is a "
                                   "`llm-ray train` run of the base config with searched values. Results, "
                                   "best_config.yaml and plots go to <output_dir>/<sweep name>/.")
    p.add_argument("--sweep", required=True, type=Path, metavar="FILE", help="sweep file, e.g. tuning/debug.yaml")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, unfinished ones resume "
                        "from their checkpoints, the searcher continues where it was")

    p = sub.add_parser("serve", help="serve a checkpoint behind an OpenAI-compatible HTTP API (Ray Serve)",
                       description="Start Ray Serve with the checkpoint (or the best by validation loss of a run "
                                   "or sweep): POST /v1/completions, GET /v1/models, GET /health and a playground "
                                   "page at /. Binds 127.0.0.1 unless host says otherwise. Ctrl-C stops it.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (or its model/ subfolder); with "
                       "--engine vllm, a Hugging Face export folder or s3:// URI")
    which.add_argument("--run", metavar="NAME|DIR", help="serve the run's best checkpoint by validation loss")
    which.add_argument("--sweep", metavar="NAME|DIR", help="serve the sweep's best checkpoint by validation loss")
    p.add_argument("--config", default=None, metavar="FILE", help="serve config YAML (see jobs/serve_config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a serve config field, e.g. --set max_batch_size=8")
    p.add_argument("--engine", choices=["builtin", "vllm"], default=None, help="builtin (default) or vllm")
    p.add_argument("--output-dir", default="runs", metavar="DIR",
                   help="where --run and --sweep names are looked up (default: runs)")

    p = sub.add_parser("preflight", help="check a config against its data, storage and cluster before a run",
                       description="Validate the config; check its sources and storage are reachable, prepared "
                                   "data agrees with the model, the workers fit the cluster's CPUs and GPUs, the "
                                   "memory estimate per worker fits, and the object store. Prints a table; exit 1 "
                                   "when a check fails. Every jobs/ entrypoint runs it first.")
    _add_config_args(p, "demo")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="Ray cluster to check against (default: $RAY_ADDRESS, else this machine)")
    p.add_argument("--sweep", type=Path, default=None, metavar="FILE", help="check a sweep file's base config")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="check a checkpoint for eval or serve instead of a training config")
    p.add_argument("--data", default=None, metavar="DIR|URI", help="the prepared data `train --data` will read")

    p = sub.add_parser("pipeline", help="prepare, train and sample in one go",
                       description="Run prepare -> train -> samples and print where everything went.")
    _add_config_args(p, "demo")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as e:
        print(f"llm-ray: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Terminated as e:  # SIGTERM, once Ray is up (ray_utils.unwind_on_sigterm; train.stop while training)
        print(f"llm-ray: terminated: {e}" if str(e) else "llm-ray: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("llm-ray: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args) -> int:
    from llm_ray.data.corpus import CorpusError
    from llm_ray.data.prepare import PrepareError
    from llm_ray.checkpoint.manifest import ResumeError
    from llm_ray.train.stop import TrainingStopped

    if args.command == "generate":
        return _generate(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "export":
        return _export(args)
    if args.command == "explain":
        return _explain(args)
    if args.command == "tune":
        return _tune(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "preflight":
        return _preflight(args)
    cfg = load_config(args.config, args.overrides)
    from llm_ray.data.sources import check_uri

    try:
        for source in cfg.data.sources:  # every URI, before Ray starts or anything is read
            check_uri(source)
    except CorpusError as e:  # a config value: the config error's exit code
        raise ConfigError(str(e)) from None
    from llm_ray.storage import StorageError, check_writable

    try:
        check_writable(cfg.run_location)
    except StorageError as e:
        print(f"llm-ray {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    from llm_ray.ray_utils import init_ray

    try:
        if args.command == "prepare":
            dump_config(cfg, cfg.run_location / "config.yaml")
            init_ray()
            from llm_ray.data.prepare import prepare

            prepare(cfg)
        elif args.command == "train":
            dump_config(cfg, cfg.run_location / "config.yaml")
            init_ray()
            from llm_ray.train.trainer import train

            r = train(cfg, args.data)
            print(f"checkpoint: {r.checkpoint}\nvalidation loss: {r.val_loss}")
        elif args.command == "cv":
            init_ray()
            from llm_ray.eval.cv import cross_validate, cv_table

            print(cv_table(cross_validate(cfg, args.folds)))
        elif args.command == "pipeline":
            init_ray()
            from llm_ray.pipeline import run_pipeline, summary

            print(summary(cfg, run_pipeline(cfg)))
    except (CorpusError, PrepareError, ResumeError, StorageError) as e:
        print(f"llm-ray {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except TrainingStopped as e:  # SIGTERM while training: a checkpoint of the step reached (train.stop)
        print(f"llm-ray {args.command}: {e}", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    return 0


def _preflight(args) -> int:
    from llm_ray.preflight import failed, preflight, preflight_checkpoint, table

    if args.checkpoint:
        rows = preflight_checkpoint(args.checkpoint, args.address)
    elif args.sweep:
        from llm_ray.config.loading import validate
        from llm_ray.config.sweep import load_sweep
        from llm_ray.sweep.runner import base_tree

        sweep, folder = load_sweep(args.sweep)
        rows = preflight(validate(base_tree(sweep, folder)), args.address)
    else:
        rows = preflight(load_config(args.config, args.overrides), args.address, args.data)
    print(table(rows), flush=True)
    return EXIT_FAILURE if failed(rows) else 0


def _tune(args) -> int:
    from llm_ray.config.sweep import load_sweep
    from llm_ray.data.corpus import CorpusError
    from llm_ray.data.prepare import PrepareError
    from llm_ray.sweep.runner import run_sweep

    sweep, folder = load_sweep(args.sweep)
    try:
        run_sweep(sweep, folder, resume=args.resume)
    except (CorpusError, PrepareError) as e:
        print(f"llm-ray tune: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def config_file_overrides(path: str) -> list[str]:
    """A YAML file's fields as dotted overrides (path=value, values as JSON, which YAML reads back)."""
    import json

    from llm_ray.config.loading import read_yaml

    def flatten(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}={json.dumps(value)}"

    return list(flatten(read_yaml(Path(path))))


def _eval(args) -> int:
    from llm_ray.data.corpus import CorpusError
    from llm_ray.eval.report import table
    from llm_ray.eval.run import EvalError, evaluate

    try:
        overrides = config_file_overrides(args.config) + args.overrides if args.config else args.overrides
        results = evaluate(args.checkpoint, overrides, args.split, args.data, args.eval_data)
    except (EvalError, CorpusError) as e:
        print(f"llm-ray eval: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(table(results))
    print(f"report: {results['report']}")
    return 0


def _export(args) -> int:
    from llm_ray.export.hf import ExportError, export_hf

    try:
        out = export_hf(args.checkpoint, args.out)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"llm-ray export: {e}", file=sys.stderr)
        return EXIT_FAILURE
    import json

    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported {arch} to {out}")
    return 0


def _explain(args) -> int:
    try:
        from llm_ray.eval.explain import explain

        r = explain(args.checkpoint, args.text, args.target, samples=args.samples)
    except ImportError as e:
        print(f"llm-ray explain: {e.name} is missing: pip install -e '.[explain]'", file=sys.stderr)
        return EXIT_FAILURE
    except (FileNotFoundError, ValueError) as e:
        print(f"llm-ray explain: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"next token {r['target']!r} (p = {r['target_probability']:.3f}); attributions of each input token:")
    for i, token in enumerate(r["tokens"]):
        print(f"  {token!r:>16} " + " ".join(f"{m[:12]:>12} {r['attributions'][m][i]:+.4f}" for m in r["attributions"]))
    print("rank agreement: " + ", ".join(f"{k} {v:+.2f}" if isinstance(v, float) else f"{k} {v}"  # "undefined"
                                         for k, v in r["rank_correlation"].items()))
    print(f"written to {r['folder']}")
    return 0


def _generate(args) -> int:
    from llm_ray.sample import sample_checkpoint

    try:
        [text] = sample_checkpoint(str(args.checkpoint), [args.prompt], args.max_new_tokens, args.temperature,
                                   args.top_k or None, args.top_p if args.top_p < 1 else None, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"llm-ray generate: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(args.prompt + text)
    return 0



def _serve(args) -> int:
    import os
    import time

    from llm_ray.config.serve import load_serve_config
    from llm_ray.serve.launch import (
        check_port_free,
        choose_checkpoint,
        hf_export_for_vllm,
        start,
    )

    overrides = list(args.overrides) + ([f"engine={args.engine}"] if args.engine else [])
    cfg = load_serve_config(args.config, overrides)
    checkpoint = choose_checkpoint(args.checkpoint, args.run, args.sweep, args.output_dir)
    if cfg.engine == "vllm":
        checkpoint = hf_export_for_vllm(checkpoint)
    cfg = cfg.model_copy(update={"checkpoint": checkpoint})
    from llm_ray.serve.app import build_app

    app = build_app(cfg.model_dump(mode="json"))  # every config problem before the port or Ray
    check_port_free(cfg.host, cfg.port)
    # `ray job stop` sends SIGTERM and kills 3 s later: once Ray is up, SIGTERM raises Terminated
    # (ray_utils.unwind_on_sigterm), so the finally below runs as on Ctrl-C
    try:
        url = start(cfg, app=app)
        print(f"serving {checkpoint} at {url} (OpenAI base_url {url}/v1; playground {url}/); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    finally:
        stop_serving(joined=bool(os.environ.get("RAY_ADDRESS")))


def stop_serving(joined: bool, name: str = "llm-ray") -> None:
    """Remove the app. On a cluster this command joined (a job), other apps stay; Serve itself (its
    controller and the proxy holding the port) goes only when no other app is left."""
    import ray
    from ray import serve

    if not ray.is_initialized():  # stopped before Ray was reached
        return
    if not joined:  # the Ray this command started
        serve.shutdown()
        return
    try:
        others = [a for a in serve.status().applications if a != name]
    except Exception:  # noqa: BLE001 - Serve never started (the deploy failed): nothing to stop
        return
    if others:
        serve.delete(name, _blocking=False)
    else:
        serve.shutdown()


if __name__ == "__main__":
    sys.exit(main())
