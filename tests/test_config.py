import re

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
        ("output_dir=gs://bucket/runs", ["output_dir", "gs://bucket/runs", "unsupported scheme"]),
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


def test_text_fields_take_the_text_as_written():
    cfg = load_config("debug", ["name=2024", "tracking.group=1e3", "tracking.entity=null", "data.text_field=true"])
    assert cfg.name == "2024" and cfg.tracking.group == "1e3" and cfg.data.text_field == "true"
    assert cfg.tracking.entity is None


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=.nan", "train.grad_clip=-.inf",
                                      "dedup.threshold=.nan", "data.mb_per_task=.inf"])
def test_infinite_and_nan_numbers_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0] + ": .*finite"):
        load_config("debug", [override])


def test_cli_names_bad_sources_and_unwritable_output_dirs_without_a_traceback(capsys):
    assert main(["prepare", "--config", "debug", "--set", "data.sources=[s3://../x]"]) == 2
    err = capsys.readouterr().err
    assert "data.sources" in err and "bucket name" in err and "Traceback" not in err
    assert main(["prepare", "--config", "debug", "--set", "output_dir=/proc/1"]) == 1
    err = capsys.readouterr().err
    assert "output_dir" in err and "/proc/1" in err and "Traceback" not in err


def test_numpy_2_is_required():
    """dedup uses np.trapezoid, which numpy 2.0 introduced."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"numpy>=2(\.\d+)*"', text)


def _field_paths(model=Config, prefix=""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            yield from _field_paths(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


FIELD_PATHS = sorted(_field_paths())
SCALARS = ["0", "-1", "1", "7", "2.5", "-0.0", "1e400", ".inf", "-.inf", ".nan", "true", "null", "~", "''",
           "[]", "{}", "[1, 2]", "{a: 1}", "2024-01-01", "!!binary aGk=", "!!python/object:os.system x", "[",
           "\x00", "yes", "0x10", "1_000", "s3://../x", "/proc/1", "a" * 300, "'" + "[" * 200]


def test_every_field_path_and_bad_value_gives_a_config_error_not_a_traceback():
    """Fuzzing: every override of every field either validates or raises ConfigError naming it."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    values = st.one_of(st.sampled_from(SCALARS), st.text(max_size=40), st.integers().map(str),
                       st.floats().map(repr))
    paths = st.one_of(st.sampled_from(FIELD_PATHS), st.text(alphabet="ab._ =", max_size=12))

    @settings(max_examples=600, deadline=None, derandomize=True)
    @given(paths, values)
    def check(path, value):
        try:
            load_config("debug", [f"{path}={value}"])
        except ConfigError as e:
            key = path.partition("=")[0].strip()  # an override splits at its first "="
            if not key:
                assert "must look like section.field=value" in str(e), (path, value, str(e))
            elif not key.split(".")[0]:  # ".a": a nameless top-level section is unknown
                assert ": unknown field; allowed here: cleaning, data," in str(e), (path, value, str(e))
            else:
                assert names_section(str(e), key), (path, value, str(e))

    check()
    for path in FIELD_PATHS:  # every field, with every kind of bad value, deterministically
        for value in SCALARS:
            try:
                load_config("debug", [f"{path}={value}"])
            except ConfigError as e:
                assert names_section(str(e), path), (path, value, str(e))


def names_section(message: str, key: str) -> bool:
    """Whether an error names the first section of the override key as a word of its own (the section
    "a" is not named by the "a" of "allowed")."""
    return re.search(rf"(?<![\w.]){re.escape(key.split('.')[0])}(?!\w)", message) is not None


def test_an_elastic_worker_range_keeps_the_global_batch_and_refuses_what_it_cannot_run():
    cfg = load_config("debug", ["train.num_workers=[1, 2]", "train.max_failures=2"])
    t = cfg.train
    assert t.elastic and (t.min_workers, t.max_workers) == (1, 2) and list(t.worker_counts) == [1, 2]
    # the same tokens per optimizer step with either count: accumulation makes up for the missing worker
    for workers in (1, 2):
        assert cfg.accum_steps(workers) * workers * t.micro_batch_size * cfg.data.block_size == t.total_batch_tokens
    assert cfg.accum_steps(1) == 2 * cfg.accum_steps(2)
    assert load_config("debug", ["train.num_workers=[2, 2]"]).train.num_workers == 2  # no range at all
    for overrides, message in (
        (["train.num_workers=[1, 2]"], "needs train.max_failures other than 0"),
        (["train.num_workers=[1, 2]", "train.max_failures=1", "train.zero_stage=3"], "needs train.zero_stage 0, 1 or 2"),
        (["train.num_workers=[1, 2]", "train.max_failures=1", "train.placement_strategy=STRICT_SPREAD"],
         "needs train.placement_strategy PACK or SPREAD"),
        (["train.num_workers=[1, 3]", "train.max_failures=1"], r"8 × 64 × 3 = 1536"),  # 3 workers cannot split 1024
        (["train.num_workers=[2, 1]"], r"\[min, max\] with 1 <= min <= max"),
        (["train.num_workers=[1, 2, 3]"], r"\[min, max\]"),
        (["train.num_workers=0"], "at least 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config("debug", overrides)
