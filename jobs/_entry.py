"""What every jobs/ entrypoint does under `ray job submit`: check that this python can run llm-ray,
run `llm-ray preflight` for the job's config or checkpoint, then the `llm-ray` command itself.

Ray starts a job's entrypoint with the head node's `python` (the first on the PATH of the shell
that ran `ray start`), in a copy of the submitted --working-dir; RAY_ADDRESS points at the cluster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_SETUP = 2
ADVICE = """\
llm-ray job: this job's python ({python}) cannot import {module}: {error}
Ray runs a job's entrypoint with the `python` of the head node's PATH. Install llm-ray into that
environment (`pip install -e .` on every node, or an image with it installed), or start the head
from the environment that has it:  source .venv/bin/activate && ray start --head ...
"""


def check_environment() -> bool:
    """True when llm-ray and its stack import here; otherwise print what to do (no traceback)."""
    for module in ("pydantic", "yaml", "torch", "ray", "deepspeed", "llm_ray.cli"):
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001 - ImportError mostly; deepspeed may raise others on a bad install
            print(ADVICE.format(python=sys.executable, module=module, error=e), file=sys.stderr)
            return False
    return True


def preflight_args(command: str, argv: list[str]) -> list[str] | None:
    """The `llm-ray preflight` arguments that check what this command will run (None: nothing to check)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--checkpoint")
    p.add_argument("--sweep")
    p.add_argument("--run")
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--data")
    p.add_argument("--engine")
    known, _ = p.parse_known_args(argv)
    if command in ("prepare", "train", "pipeline", "cv"):
        data = ["--data", known.data] if command == "train" and known.data else []
        return ["--config", known.config or ("debug" if command == "cv" else "demo"),
                *(f"--set={o}" for o in known.overrides), *data]
    if command == "tune":
        return ["--sweep", known.sweep] if known.sweep else None
    if command == "eval":
        return ["--checkpoint", known.checkpoint] if known.checkpoint else None
    if command == "serve":
        if known.engine == "vllm" or any(o.replace(" ", "") == "engine=vllm" for o in known.overrides):
            return None  # vLLM reads a Hugging Face export (or s3://) itself; its server checks it
        if known.checkpoint and "://" not in known.checkpoint:
            return ["--checkpoint", known.checkpoint]
        if known.run or known.sweep:
            from llm_ray.serve.launch import choose_checkpoint

            return ["--checkpoint", choose_checkpoint(None, known.run, known.sweep, known.output_dir)]
    return None


def run(command: str, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(ROOT))  # the working dir holds llm_ray/
    if not check_environment():
        return EXIT_SETUP
    from llm_ray.cli import main

    if "-h" not in argv and "--help" not in argv:
        try:
            checks = preflight_args(command, argv)
        except Exception as e:  # noqa: BLE001 - e.g. a --run with no checkpoint: the command says it best
            checks = None
            print(f"llm-ray job: preflight skipped: {e}", file=sys.stderr)
        if checks is not None:
            code = main(["preflight", *checks])
            if code != 0:
                print(f"llm-ray job: `{command}` not started: the preflight failed (see above)", file=sys.stderr)
                return code
    return main([command, *argv])
