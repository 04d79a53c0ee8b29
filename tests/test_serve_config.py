"""Serving without a server: the config, the options handed to Ray Serve, the checkpoint choice,
the vLLM app's config (Ray's own schema), the CLI's refusals."""

import json
import shutil

import pytest
import torch

from llm_ray.checkpoint import save_inference, write_history
from llm_ray.checkpoint.best import CheckpointChoiceError, best_checkpoint
from llm_ray.checkpoint.manifest import write_manifest
from llm_ray.cli import main
from llm_ray.config import ConfigError, load_config, model_spec
from llm_ray.config.serve import ServeConfig, load_serve_config
from llm_ray.data.tokenizer import train_bpe
from llm_ray.model import GPT
from llm_ray.serve.app import build_app
from llm_ray.serve.launch import check_port_free, hf_export_for_vllm
from llm_ray.serve.options import deployment_options
from llm_ray.serve.vllm import llm_config, validated
from llm_ray.storage import Location
from tests.conftest import CORPUS


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([p.read_text() for p in sorted(CORPUS.glob("play_*.txt"))], 300, 2, 100_000)


def checkpoint(folder, tokenizer, step: int, val_loss: float | None, complete: bool = True):
    """A checkpoint folder as Ray Train leaves it: model/ with weights and state, and a manifest."""
    cfg = load_config("debug", ["tokenizer.vocab_size=300"])
    torch.manual_seed(step)
    history = [{"step": step, "train_loss": 5.0}] + ([{"step": step, "val_loss": val_loss}] if val_loss else [])
    history_dir = Location(str(folder / "history"))  # the run's history, one file per checkpoint (here: one)
    write_history(history_dir, 0, step, history)
    save_inference(folder, GPT(model_spec(cfg)).state_dict(), cfg, tokenizer.to_str(),
                   {"step": step, "tokens": step * 1024, "data_key": "k", "history": [],
                    "history_dir": history_dir.uri, "history_through": step})
    if complete:
        write_manifest(folder, 0, 1)
    return folder / "model"


def test_defaults_bind_loopback_and_limits_are_checked(tmp_path):
    cfg = ServeConfig()
    assert cfg.host == "127.0.0.1" and cfg.engine == "builtin" and cfg.limits.max_tokens == 512
    with pytest.raises(ValueError, match="limits.max_n .* exceeds max_batch_size"):
        ServeConfig(max_batch_size=2, limits={"max_n": 4})
    with pytest.raises(ValueError, match="limits.default_max_tokens"):
        ServeConfig(limits={"max_tokens": 8, "default_max_tokens": 16})
    with pytest.raises(ValueError, match="min_replicas .* exceeds max_replicas"):
        ServeConfig(autoscaling={"min_replicas": 3, "max_replicas": 2})
    assert ServeConfig().ingress == "auto" and ServeConfig(num_replicas=3).single_replica is False
    for several in ({"num_replicas": 2}, {"autoscaling": {"max_replicas": 2}}):
        with pytest.raises(ValueError, match="ingress direct serves one replica"):
            ServeConfig(ingress="direct", **several)
    path = tmp_path / "serve.yaml"
    path.write_text("max_batch_size: 4\nlimits: {max_n: 2, max_prompts: 3, max_stop: 1, max_body_bytes: 2048}\n")
    cfg = load_serve_config(path, ["port=9001", "model_id=2024"])
    assert (cfg.max_batch_size, cfg.limits.max_n, cfg.port, cfg.model_id) == (4, 2, 9001, "2024")
    with pytest.raises(ConfigError, match="limits.max_nn: unknown field; allowed here: .*max_n"):
        load_serve_config(None, ["limits.max_nn=3"])


def test_deployment_options_reach_ray_serve():
    from llm_ray.serve.app import CompletionServer

    fixed = ServeConfig(num_replicas=3, max_ongoing_requests=5, max_queued_requests=7, cpus_per_replica=0.5,
                        gpus_per_replica=1)
    d = CompletionServer.options(**deployment_options(fixed))
    assert (d.num_replicas, d.max_ongoing_requests, d.max_queued_requests) == (3, 5, 7)
    assert d.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 1}
    scaled = ServeConfig(num_replicas=3, autoscaling={"min_replicas": 0, "max_replicas": 4,
                                                      "target_ongoing_requests": 6})
    auto = CompletionServer.options(**deployment_options(scaled))._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (0, 4, 6)


def test_best_checkpoint_skips_incomplete_ones_and_needs_validation(tmp_path, tokenizer):
    run = tmp_path / "run" / "checkpoints" / "run"
    checkpoint(run / "checkpoint_1", tokenizer, 10, 4.0)
    best = checkpoint(run / "checkpoint_2", tokenizer, 20, 3.5)
    checkpoint(run / "checkpoint_3", tokenizer, 30, 3.0, complete=False)  # a save that did not finish
    checkpoint(run / "checkpoint_4", tokenizer, 40, None)  # no validation at its step
    choice = best_checkpoint(tmp_path / "run", "run x")
    assert choice.model_dir == best.resolve() and (choice.step, choice.val_loss, choice.compared) == (20, 3.5, 2)
    # The run's published model/ (a copy of checkpoint_2's inference files) is that checkpoint, not a third.
    shutil.copytree(best, tmp_path / "run" / "model")
    again = best_checkpoint(tmp_path / "run", "run x")
    assert again.model_dir == best.resolve() and again.compared == 2
    only = tmp_path / "other" / "checkpoint_1"
    checkpoint(only, tokenizer, 5, None)
    with pytest.raises(CheckpointChoiceError, match="train.checkpoint_every should be a multiple of train.eval_every"):
        best_checkpoint(tmp_path / "other", "run other")


def test_serve_cli_refuses_bad_input_before_starting_anything(tmp_path, tokenizer, capsys):
    assert main(["serve", "--run", "nope", "--output-dir", str(tmp_path)]) == 2
    assert "--run nope: neither nope nor" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path), "--set", "limits.max_n=99"]) == 2
    assert "limits.max_n (99) exceeds max_batch_size (16)" in capsys.readouterr().err
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    assert main(["serve", "--checkpoint", str(tmp_path)]) == 2
    assert "pytorch_model.bin are pickle files, which llm-ray never loads" in capsys.readouterr().err


def test_a_port_in_use_is_refused():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match="is in use"):
            check_port_free("127.0.0.1", s.getsockname()[1])


def test_vllm_app_config_is_built_from_the_export(tmp_path, tokenizer, monkeypatch):
    """engine vllm: the checkpoint is exported once; Ray's LLMConfig schema accepts what llm-ray
    builds, with the serve config's scaling, queue limits, batch size, stream interval and engine
    settings; builtin-only settings are refused, not ignored."""
    import transformers  # noqa: F401  (a [test] dependency: missing, the test fails rather than skips)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = checkpoint(tmp_path / "checkpoint_1", tokenizer, 12, 3.25)
    source = hf_export_for_vllm(str(model_dir), log=lambda *_: None)
    assert source == str(tmp_path / "checkpoint_1" / "hf")
    provenance = json.loads((tmp_path / "checkpoint_1" / "hf" / "llm_ray_provenance.json").read_text())
    assert (provenance["run"], provenance["step"], provenance["val_loss"]) == ("debug", 12, 3.25)
    cfg = ServeConfig(engine="vllm", checkpoint=source, autoscaling={"min_replicas": 1, "max_replicas": 3},
                      max_ongoing_requests=48, max_queued_requests=96, max_batch_size=32, stream_interval_ms=25,
                      vllm={"accelerator_type": "L4", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.8,
                            "engine_kwargs": {"enforce_eager": True}})
    llm = validated(llm_config(cfg))
    assert llm.model_id == "debug@12" and llm.model_loading_config.model_source == source
    assert llm.accelerator_type == "L4"
    assert llm.engine_kwargs == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8, "max_num_seqs": 32,
                                 "max_model_len": 64, "enforce_eager": True}
    assert llm.experimental_configs == {"stream_batching_interval_ms": 25}
    assert hf_export_for_vllm(str(model_dir), log=lambda *_: None) == source  # exported once
    for field, value in (("request_timeout_s", 5.0), ("limits", {"max_n": 2}), ("torch_threads", 2)):
        with pytest.raises(ConfigError, match=f"engine vllm: {field} apply to the builtin engine only"):
            llm_config(ServeConfig.model_validate({**cfg.model_dump(), field: value}))
    assert llm.deployment_config["autoscaling_config"]["max_replicas"] == 3
    assert llm.deployment_config["max_queued_requests"] == 96
    with pytest.raises(ConfigError, match="accelerator_type"):
        validated(llm_config(cfg.model_copy(update={"vllm": cfg.vllm.model_copy(update={"accelerator_type": "X"})})))
    with pytest.raises(ConfigError, match="no config.json: engine vllm needs a Hugging Face export"):
        llm_config(ServeConfig(engine="vllm", checkpoint=str(model_dir)))
    try:
        import vllm  # noqa: F401
    except ImportError:  # this machine: the app needs vLLM, and the error says how to get it
        with pytest.raises(ConfigError, match=r"engine vllm needs vLLM: pip install 'llm-ray\[vllm\]'"):
            build_app(cfg.model_dump())
    else:  # a GPU node with the extra installed: Ray's app is built (not started)
        from ray.serve import Application

        assert isinstance(build_app(cfg.model_dump()), Application)


def test_a_damaged_checkpoint_is_refused_before_any_replica_starts(tmp_path, tokenizer, capsys):
    model_dir = checkpoint(tmp_path / "checkpoint_1", tokenizer, 10, 3.0)
    build_app({"checkpoint": str(model_dir)})  # intact: the app builds
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 16)
    assert main(["serve", "--checkpoint", str(model_dir)]) == 2
    assert f"checkpoint: {model_dir / 'model.safetensors'} is missing or unreadable" in capsys.readouterr().err
    other = checkpoint(tmp_path / "checkpoint_2", tokenizer, 10, 3.0)
    config = (other / "config.yaml").read_text().replace("n_embd: 64", "n_embd: 32")
    (other / "config.yaml").write_text(config)
    assert main(["serve", "--checkpoint", str(other)]) == 2
    assert "does not fit the model in its config.yaml: lm_head" not in (err := capsys.readouterr().err)
    assert "model.safetensors does not fit the model in its config.yaml: transformer.h.0.attn.c_attn" in err
