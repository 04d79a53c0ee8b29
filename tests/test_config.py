import pytest
import yaml

from llm_ray.cli import main
from llm_ray.config import PRESETS, Config, ConfigError, dump_config, load_config, model_spec


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates_and_builds_a_model_spec(name):
    cfg = load_config(name)
    spec = model_spec(cfg)
    assert spec.vocab_size == cfg.tokenizer.vocab_size
    assert cfg.grad_accum_steps >= 1


def test_gpt2_preset_has_gpt2_small_shape():
    cfg = load_config("gpt2-124m")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.context_length) == (12, 12, 768, 1024)
    assert cfg.train.precision == "bf16" and cfg.train.use_gpu
    # 16 sequences x 1024 tokens x 8 workers x 4 micro-steps = 524288 tokens per step
    assert cfg.grad_accum_steps == 4


def test_overrides_are_parsed_and_coerced():
    cfg = load_config("debug", ["model.n_layer=6", "train.lr=1e-3", "model.bias=false", "data.sources=[a.txt, b.txt]"])
    assert cfg.model.n_layer == 6 and isinstance(cfg.model.n_layer, int)
    assert cfg.train.lr == 1e-3
    assert cfg.model.bias is False
    assert cfg.data.sources == ["a.txt", "b.txt"]


def test_booleans_are_not_ints():
    with pytest.raises(ConfigError, match="model.bias"):
        load_config("debug", ["model.bias=1"])


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("model.n_head=7", ["model.n_head", "7", "must divide n_embd"]),
        ("model.n_headz=2", ["model.n_headz", "unknown field", "n_head"]),
        ("train.zero_stage=5", ["train.zero_stage", "5", "0, 1, 2 or 3"]),
        ("model.pos_encoding=alibi", ["model.pos_encoding", "alibi", "learned", "rope"]),
        ("train.lr=fast", ["train.lr", "fast"]),
        ("data.block_size=128", ["data.block_size", "model.context_length"]),
        ("model.vocab_size=1000", ["model.vocab_size", "tokenizer.vocab_size"]),
        ("train.total_batch_tokens=1000", ["train.total_batch_tokens", "1000", "multiple"]),
        ("nosuchsection.x=1", ["nosuchsection", "unknown field"]),
        ("model.n_layer.deeper=1", ["model.n_layer", "not a section"]),
        ("model.n_layer", ["model.n_layer", "section.field=value"]),
    ],
)
def test_bad_overrides_name_the_field(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config("debug", [override])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(listing))
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match="model.n_layers: unknown field"):
        load_config(str(typo))
    with pytest.raises(ConfigError, match="preset"):
        load_config("no-such-preset")


def test_cli_exits_2_with_a_short_message(capsys):
    assert main(["train", "--config", "debug", "--set", "model.n_head=7"]) == 2
    err = capsys.readouterr().err
    assert "model.n_head" in err and "Traceback" not in err
    assert len(err.splitlines()) <= 3


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("demo", ["model.n_layer=3"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = Config.model_validate(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(Config)


def test_cli_help_describes_every_option(capsys):
    import argparse

    from llm_ray.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, subparser in sub.choices.items():
        assert subparser.description, name
        for action in subparser._actions:
            assert action.help, f"llm-ray {name} {action.option_strings or action.dest} has no help text"
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        assert f"usage: llm-ray {name}" in capsys.readouterr().out
