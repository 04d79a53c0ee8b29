"""The root config: every component's section, and the checks that span sections."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from llm_ray.config.base import Section
from llm_ray.config.data import CleaningConfig, DataConfig, DedupConfig, TokenizerConfig
from llm_ray.config.eval import EvalConfig
from llm_ray.config.model import ModelConfig
from llm_ray.config.train import SampleConfig, TrackingConfig, TrainConfig, elastic_problems, muon_problems
from llm_ray.storage import Location, StorageError


class Config(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$", description="Run name; outputs go to output_dir/name.")
    output_dir: str = Field("runs", description="Where prepared data, checkpoints and reports go: a local folder, "
                            "or s3://bucket/prefix (endpoint and region from data.s3, credentials from the AWS "
                            "chain), which a multi-node cluster needs unless data.shared_filesystem is true.")
    seed: int = Field(1337, ge=0, description="Seed of initialization, shuffling and the validation sample "
                      "(the train/validation/test assignment has its own, data.split_seed).")
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus reading, splitting and packing.")
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig, description="Document cleaning and filters.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and near-duplicate removal.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="BPE tokenizer training.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Transformer architecture.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Distributed training.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Metrics tracking.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Sampling after training.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation of held-out documents.")

    @field_validator("output_dir")
    @classmethod
    def _folder_or_s3(cls, value: str) -> str:
        try:  # s3://bucket/prefix or a local path; other schemes, '..' keys and bad buckets are refused
            Location.parse(value)
        except StorageError as e:
            raise ValueError(str(e).removeprefix("output_dir: ")) from None
        return value

    @model_validator(mode="after")
    def _cross_checks(self):
        problems = []
        if self.model.vocab_size is not None and self.model.vocab_size != self.tokenizer.vocab_size:
            problems.append(
                f"model.vocab_size ({self.model.vocab_size}) must match tokenizer.vocab_size "
                f"({self.tokenizer.vocab_size}); set it to null to follow the tokenizer"
            )
        if self.data.block_size > self.model.context_length:
            problems.append(
                f"data.block_size ({self.data.block_size}) exceeds model.context_length ({self.model.context_length})"
            )
        for workers in self.train.worker_counts:  # an elastic run may have any of them
            per_micro_step = self.train.micro_batch_size * self.data.block_size * workers
            if self.train.total_batch_tokens % per_micro_step:
                problems.append(
                    f"train.total_batch_tokens ({self.train.total_batch_tokens}) must be a multiple of "
                    f"micro_batch_size × block_size × num_workers = {self.train.micro_batch_size} × "
                    f"{self.data.block_size} × {workers} = {per_micro_step}"
                )
                break
        if self.data.val_fraction + self.data.test_fraction >= 0.9:
            problems.append(f"data.val_fraction + data.test_fraction ({self.data.val_fraction} + "
                            f"{self.data.test_fraction}) leaves too little for training")
        t = self.train
        if t.precision == "fp16" and not t.use_gpu:
            problems.append("train.precision fp16 needs train.use_gpu=true (loss scaling is a GPU feature); "
                            "use fp32 with train.autocast_bf16 on CPU")
        if t.autocast_bf16 is True and t.precision != "fp32":
            problems.append(f"train.autocast_bf16 works with train.precision fp32 (got {t.precision})")
        if t.offload_optimizer and t.zero_stage == 0:
            problems.append("train.offload_optimizer needs train.zero_stage 1, 2 or 3")
        if t.l1 > 0 and t.zero_stage == 3:
            problems.append("train.l1 needs the full weights on every worker: use train.zero_stage 0, 1 or 2")
        if t.offload_optimizer and t.optimizer == "sgd":
            problems.append("train.offload_optimizer supports train.optimizer adam and adamw, not sgd")
        if t.offload_params and t.zero_stage != 3:
            problems.append(f"train.offload_params needs train.zero_stage 3 (got {t.zero_stage})")
        problems += muon_problems(t) + elastic_problems(t)
        if self.train.min_lr > self.train.lr:
            problems.append(f"train.min_lr ({self.train.min_lr}) exceeds train.lr ({self.train.lr})")
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size or self.tokenizer.vocab_size

    @property
    def grad_accum_steps(self) -> int:
        """Micro-steps per optimizer step with train.max_workers workers (see accum_steps)."""
        return self.accum_steps(self.train.max_workers)

    def accum_steps(self, workers: int) -> int:
        """Micro-steps per optimizer step with this many workers, derived from total_batch_tokens (checked
        divisible above for every worker count the run may have): the global batch stays the same."""
        t = self.train
        return t.total_batch_tokens // (t.micro_batch_size * self.data.block_size * workers)

    @property
    def run_location(self):
        """<output_dir>/<name>: a local folder or an S3 prefix (see llm_ray.storage)."""
        return Location.parse(self.output_dir, self.data.s3) / self.name

    @property
    def run_dir(self) -> Path:
        """The run folder on this disk; for an output_dir on S3, raises StorageError (use run_location)."""
        return self.run_location.local()
