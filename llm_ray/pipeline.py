"""prepare -> train -> samples: the whole path on one config."""

from __future__ import annotations

from dataclasses import dataclass

from llm_ray.config import Config, dump_config
from llm_ray.data.prepare import data_dir, prepare
from llm_ray.eval.report import table
from llm_ray.eval.run import evaluate
from llm_ray.sample import sample_checkpoint
from llm_ray.train.trainer import TrainResult, train


@dataclass
class PipelineResult:
    manifest: dict
    train: TrainResult
    samples: list[tuple[str, str]]
    evaluation: dict


def run_pipeline(cfg: Config, log=print) -> PipelineResult:
    dump_config(cfg, cfg.run_location / "config.yaml")
    manifest = prepare(cfg, log=log)
    result = train(cfg, data_dir(cfg), log=log)
    s = cfg.sample
    texts = sample_checkpoint(result.checkpoint, s.prompts, s.max_new_tokens, s.temperature, s.top_k, s.top_p,
                              s.seed)
    evaluation = evaluate(result.checkpoint, data_path=data_dir(cfg), log=log)
    return PipelineResult(manifest, result, list(zip(s.prompts, texts)), evaluation)


def summary(cfg: Config, r: PipelineResult) -> str:
    baseline = r.manifest["unigram_val_loss"]
    lines = ["", "=" * 72, "Samples:"]
    for prompt, text in r.samples:
        lines += [f"--- {prompt!r}", prompt + text]
    lines += [
        "=" * 72,
        f"run folder:        {cfg.run_location}",
        f"resolved config:   {cfg.run_location / 'config.yaml'}",
        f"prepared data:     {data_dir(cfg)}",
        f"checkpoint:        {r.train.checkpoint}",
        f"steps:             {r.train.step}",
    ]
    if r.train.val_loss is not None:
        lines.append(f"validation loss:   {r.train.val_loss:.3f} nats/token "
                     f"(unigram baseline {baseline:.3f}; {baseline - r.train.val_loss:+.3f} better)")
    lines.append(f"generate more:     llm-ray generate --checkpoint {r.train.checkpoint} --prompt '...'")
    lines += ["=" * 72, table(r.evaluation), f"report:            {r.evaluation['report']}"]
    return "\n".join(lines)
