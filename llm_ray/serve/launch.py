"""`llm-ray serve`: choose the checkpoint, start Ray Serve on this machine's Ray, print the URL."""

from __future__ import annotations

from llm_ray.checkpoint import find_model_dir
from llm_ray.checkpoint.best import CheckpointChoiceError, best_checkpoint, find_folder
from llm_ray.config import ConfigError
from llm_ray.config.serve import ServeConfig
from llm_ray.export.hf import ExportError, export_hf
from llm_ray.ray_utils import init_ray
from llm_ray.serve.app import build_app


def choose_checkpoint(checkpoint: str | None, run: str | None, sweep: str | None, output_dir: str = "runs",
                      log=print) -> str:
    """The checkpoint to serve: the given folder, or the best by validation loss of a run or a sweep."""
    if checkpoint is not None:
        return checkpoint
    what, name = ("--run", run) if run is not None else ("--sweep", sweep)
    try:
        choice = best_checkpoint(find_folder(name, output_dir, what), f"{what} {name}")
    except CheckpointChoiceError as e:
        raise ConfigError(str(e)) from None
    log(f"serve: best checkpoint of {what[2:]} {name} by validation loss: {choice.model_dir} (step {choice.step}, "
        f"val loss {choice.val_loss:.4f}; {choice.compared} checkpoints compared)")
    return str(choice.model_dir)


def hf_export_for_vllm(checkpoint: str, log=print) -> str:
    """engine vllm serves a Hugging Face export: an llm-ray checkpoint is exported once, beside it."""
    from pathlib import Path

    if checkpoint.startswith("s3://") or (Path(checkpoint).expanduser() / "config.json").is_file():
        return checkpoint
    try:
        model_dir = find_model_dir(checkpoint).resolve()
    except FileNotFoundError:
        return checkpoint  # the vLLM config builder says what is missing
    out = model_dir.parent / "hf"
    if not out.is_dir():  # written under another name, then renamed: never a half-written export
        import os
        import shutil

        partial = out.with_name(f".hf.{os.getpid()}.tmp")
        try:
            export_hf(model_dir, partial)
        except ExportError as e:
            raise ConfigError(f"engine vllm: {e}") from None
        finally:
            if not (partial / "config.json").is_file():
                shutil.rmtree(partial, ignore_errors=True)
        partial.rename(out)
        log(f"serve: exported {model_dir} to {out} for vLLM")
    return str(out)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another server holds: Ray Serve's proxy binds with SO_REUSEPORT, so a second
    server on the same port would silently share its requests with the first."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a stopped server's TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"port: {host}:{port} is in use ({e.strerror}): stop the server there, or choose "
                              "another with --set port=N") from None


def direct_ingress_env(port: int) -> dict[str, str]:
    """The environment a Ray needs from its start for Serve's direct ingress with the replica on port:
    the replica's HTTP port range is that one port, and a stopping replica does not wait for a load
    balancer to forget it (there is none)."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(cfg: ServeConfig, name: str = "llm-ray", app=None, log=print) -> str:
    """Deploy the app (built from cfg unless given) on Ray (joined or started here) and return its URL,
    cfg.host:cfg.port.

    With direct ingress (cfg.ingress direct, or auto with one replica on a Ray started here) the
    replica answers on that port itself, and Serve's proxy, unused, gets a free port of the same host."""
    import os

    import ray
    from ray import serve

    app = app or build_app(cfg.model_dump(mode="json"))  # config errors before Ray starts
    starts_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if cfg.ingress == "direct" and not starts_ray:
        raise ConfigError("ingress: direct needs a Ray that llm-ray serve starts (the setting reaches Ray's "
                          "processes as they start); on a running Ray set ingress: proxy, or auto")
    direct = cfg.ingress == "direct" or (cfg.ingress == "auto" and cfg.single_replica and starts_ray)
    log(f"serve: {'direct ingress: the replica answers' if direct else 'Serve proxy'} on {cfg.host}:{cfg.port}")
    if direct:
        os.environ.update(direct_ingress_env(cfg.port))  # read by Ray's processes as they start
    init_ray()
    serve.start(http_options={"host": cfg.host, "port": free_port(cfg.host) if direct else cfg.port})
    serve.run(app, name=name, route_prefix=cfg.route_prefix, blocking=False)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
