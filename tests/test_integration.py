"""The debug preset end to end on one shared local Ray: prepare -> train -> generate."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_ray.checkpoint import load_model, read_train_state
from llm_ray.cli import main
from llm_ray.config import load_config
from llm_ray.data.prepare import data_dir, load_manifest, prepare
from llm_ray.train.trainer import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def debug_config(tmp: Path, corpus_dir: Path, *overrides: str):
    return load_config("debug", [f"output_dir={tmp}", f"data.sources=[{corpus_dir}]", "data.max_files=null",
                                 *overrides])


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    from tests.conftest import CORPUS

    tmp = tmp_path_factory.mktemp("runs")
    cfg = debug_config(tmp, CORPUS)
    manifest = prepare(cfg, log=lambda *_: None)
    return cfg, manifest


def test_prepare_writes_shards_manifest_and_tokenizer(prepared):
    cfg, manifest = prepared
    out = data_dir(cfg)
    assert load_manifest(out) == manifest
    assert manifest["files"] == 15 and manifest["documents"]["train"] + manifest["documents"]["val"] == 16
    assert manifest["documents"]["val"] >= 1 and manifest["dtype"] == "uint16"
    for split in ("train", "val"):
        total = 0
        for shard in manifest["splits"][split]["shards"]:
            arr = np.load(out / shard["file"])
            assert arr.dtype == np.uint16 and arr.shape[1] == cfg.data.block_size + 1
            total += len(arr)
        assert total == manifest["splits"][split]["blocks"] > 0
    assert (out / manifest["tokenizer"]).is_file()
    assert 3 < manifest["unigram_val_loss"] < math.log(cfg.tokenizer.vocab_size)
    # The validation split is held out by document: rerunning holds out the same documents.
    assert prepare(cfg, log=lambda *_: None)["documents"] == manifest["documents"]


@pytest.mark.parametrize("stage", [2, 3])
def test_train_two_workers_loss_falls_and_checkpoint_reloads(prepared, stage):
    cfg, manifest = prepared
    data = data_dir(cfg)
    cfg = cfg.model_copy(update={"name": f"zero{stage}"}, deep=True)
    cfg.train.zero_stage = stage
    result = train(cfg, data, log=lambda *_: None)

    assert result.step == cfg.train.max_steps
    evals = [h["val_loss"] for h in result.history]
    assert [h["step"] for h in result.history] == [0, 20, 40, 60]
    assert evals[0] == pytest.approx(math.log(cfg.tokenizer.vocab_size), abs=0.3)  # untrained: near uniform
    assert evals[1] > evals[2] > evals[3]
    assert evals[-1] < evals[0] - 1.0  # learning, not noise
    assert read_train_state(result.checkpoint)["step"] == cfg.train.max_steps

    # The consolidated safetensors weights equal DeepSpeed's own (sharded) training state.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model, tokenizer, saved_cfg = load_model(result.checkpoint)
    assert saved_cfg == cfg
    ds_state = get_fp32_state_dict_from_zero_checkpoint(str(Path(result.checkpoint) / "deepspeed"), tag="state")
    reference, _, _ = load_model(result.checkpoint)
    reference.load_state_dict(ds_state, strict=False)
    probe = torch.randint(0, manifest["vocab_size"], (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(probe)[0], reference(probe)[0], rtol=0, atol=0)


def test_generate_cli_prints_a_continuation(prepared, capsys):
    cfg, _ = prepared
    checkpoints = sorted(p for p in cfg.run_dir.parent.glob("zero*/checkpoints/*/checkpoint_*") if p.is_dir())
    assert checkpoints, "the training test runs first and leaves a checkpoint"
    args = ["generate", "--checkpoint", str(checkpoints[-1]), "--prompt", "ROMEO:", "--max-new-tokens", "20",
            "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.strip()) > len("ROMEO:")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded
    assert main(["generate", "--checkpoint", str(cfg.run_dir), "--prompt", "x"]) == 1


def test_pipeline_runs_end_to_end(ray_session, tmp_path, corpus_dir, capsys):
    code = main(["pipeline", "--config", "debug", "--set", f"output_dir={tmp_path}",
                 "--set", f"data.sources=[{corpus_dir}]", "--set", "data.max_files=null",
                 "--set", "train.max_steps=10"])
    assert code == 0
    out = capsys.readouterr().out
    assert "checkpoint:" in out and "unigram baseline" in out and "ROMEO:" in out
    resolved = json.loads(json.dumps(load_config(str(tmp_path / "debug" / "config.yaml")).model_dump()))
    assert resolved["train"]["max_steps"] == 10
