"""Training, tracking and sampling settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, field_validator

from llm_ray.config.base import Section


class TrainConfig(Section):
    num_workers: int | list[int] = Field(
        2, description="Ray Train workers (processes); one per GPU on a GPU cluster. [min, max]: elastic "
        "(ZeRO 0-2): a run starts with as many as fit, goes on with fewer (at least min) from the newest "
        "checkpoint when a node is lost, and grows back to max when capacity returns; the global batch and "
        "the data order stay the same. Needs train.max_failures other than 0 (a lost node is a failure)."
    )
    use_gpu: StrictBool = Field(False, description="One GPU per worker, NCCL backend; otherwise CPU and gloo.")
    cpus_per_worker: float = Field(
        1.0,
        gt=0,
        description="CPU cores Ray reserves for each training worker; a fraction (such as 0.5 with as many "
        "workers as cores) leaves room for other Ray tasks on the same machine.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers on the nodes: PACK fills as few nodes as it can, SPREAD "
        "puts them on different nodes where it can, STRICT_* insist (Ray's placement group strategies)."
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
    autocast_bf16: StrictBool | Literal["auto"] = Field(
        False, description="Run matmuls in bf16 under torch.autocast while weights stay fp32 (precision fp32); "
        "a large speed-up on CPUs with AMX and on GPUs. 'auto': on where each worker finds bf16 matmuls fast "
        "(a CPU with AMX, a CUDA GPU with bf16), off elsewhere."
    )
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per forward/backward pass.")
    total_batch_tokens: int = Field(
        4096, ge=1, description="Tokens per optimizer step over all workers; gradient accumulation is derived."
    )
    max_steps: int = Field(200, ge=1, description="Optimizer steps to run.")
    optimizer: Literal["adamw", "adam", "sgd", "muon"] = Field(
        "adamw", description="adamw (decoupled weight decay), adam (L2 penalty in the gradient), sgd, or muon "
        "(Muon's orthogonalized momentum on the 2-D weights inside the blocks, AdamW on embeddings, output "
        "layer, norms and biases; fp32 or bf16, no optimizer offload; ZeRO stage 1-3 need grad_clip 0, as "
        "DeepSpeed clips Muon's orthogonalized update there)."
    )
    muon_lr: float = Field(
        0.02, gt=0, description="Peak learning rate of Muon's matrices (optimizer muon), in spectral norm per "
        "step; it follows lr's schedule (scaled by muon_lr / lr). The AdamW parameters use lr."
    )
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's (Nesterov) momentum (optimizer muon).")
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
        8, ge=1, description="Validation micro-batches at each evaluation, over all workers: a sample of "
        "eval_batches x micro_batch_size validation blocks (or all of them) drawn with `seed`, the same at every "
        "evaluation whatever the worker count."
    )
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every N steps (and at the end).")
    storage_path: str | None = Field(
        None, description="Where Ray Train keeps checkpoints: null for <output_dir>/<name>/checkpoints, or an "
        "s3://bucket/prefix URI (endpoint and region from data.s3; credentials from the AWS chain only). The "
        "final checkpoint's inference files are also published to <output_dir>/<name>/model (replaced whole at the end "
        "of each run)."
    )
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async", description="Checkpoints on remote storage (S3): async writes each to the worker's disk and "
        "uploads it in a background thread while training goes on (its manifest last; one upload at a time, "
        "the next checkpoint waits for it; a failed file is retried, then reported, and training goes on); sync "
        "uploads before the next step. Local storage is copied before the next step either way."
    )
    num_checkpoints_to_keep: int = Field(2, ge=1, description="Checkpoints Ray Train keeps (the latest ones).")
    log_every: int = Field(10, ge=1, description="Print a progress line every N steps.")
    spike_factor: float = Field(
        4.0, ge=0, description="Discard the optimizer step of a micro-batch whose loss exceeds this multiple of "
        "the recent mean (0 disables); steps with a NaN or inf loss are always discarded."
    )
    max_skipped_batches: int = Field(
        10, ge=0, description="Stop with an error once the guard's discarded steps held more micro-batches than this."
    )
    activation_checkpointing: StrictBool = Field(
        False, description="Recompute each block's activations in the backward pass: less memory, ~30% more compute."
    )
    peak_tflops_per_worker: float | None = Field(
        None, gt=0, description="Peak matmul TFLOP/s of one worker's device, for MFU; null leaves MFU out "
        "(benchmarks/train_throughput.py measures it)."
    )
    elastic_resize_interval_s: float = Field(
        60, gt=0, description="With an elastic num_workers [min, max]: how often Ray Train checks whether more "
        "workers fit while training runs; growing restarts the workers from the newest checkpoint."
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts Ray Train attempts after a failure, resuming from the "
        "latest checkpoint; -1 retries forever."
    )
    preemption_grace_s: float = Field(
        30, gt=0, description="On SIGTERM to the command (a spot instance's notice, `ray job stop`, a pod's "
        "deletion) the workers finish the step in flight and write a checkpoint; the command waits this many "
        "seconds for it, then exits keeping the last complete checkpoint. A second SIGTERM exits at once. Under "
        "`ray job stop`, set RAY_JOB_STOP_WAIT_TIME_S in the job's runtime_env above this (Ray's default is 3 s)."
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
    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value):
        if isinstance(value, list):
            if len(value) != 2 or not 1 <= value[0] <= value[1]:
                raise ValueError("an elastic num_workers is [min, max] with 1 <= min <= max")
            return value[0] if value[0] == value[1] else value
        if value < 1:
            raise ValueError(f"num_workers must be at least 1 (got {value})")
        return value

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    @property
    def worker_counts(self) -> range:
        """Every worker count the run may have."""
        return range(self.min_workers, self.max_workers + 1)

    prefetch_batches: int = Field(
        2, ge=0, description="Micro-batches each worker's background thread reads ahead of training (into "
        "pinned memory on GPU, so that the copy to the device overlaps); 0 reads each when it is needed. "
        "The batches are the same either way."
    )


def elastic_problems(t: TrainConfig) -> list[str]:
    """What an elastic num_workers [min, max] cannot run with."""
    if not t.elastic:
        return []
    problems = []
    if t.max_failures == 0:
        problems.append(f"train.num_workers {t.num_workers} (elastic) needs train.max_failures other than 0 (-1: "
                        "no limit): a lost node fails the workers, and Ray Train restarts them with fewer")
    if t.zero_stage == 3:
        problems.append(f"train.num_workers {t.num_workers} (elastic) needs train.zero_stage 0, 1 or 2: a ZeRO-3 "
                        "checkpoint resumes only under the worker count that wrote it")
    if t.placement_strategy.startswith("STRICT_"):
        problems.append(f"train.num_workers {t.num_workers} (elastic) needs train.placement_strategy PACK or SPREAD "
                        f"(got {t.placement_strategy}): Ray Train counts the workers that fit over every node's "
                        "CPUs, which a strict placement may not honour")
    return problems


def muon_problems(t: TrainConfig) -> list[str]:
    """The settings under which DeepSpeed's Muon would not train as Muon (train.engine.check_muon says why;
    tests/test_muon.py shows each): checked with the config, and again where the engine is built."""
    if t.optimizer != "muon":
        return []
    problems = []
    if t.zero_stage >= 1 and t.grad_clip > 0:
        problems.append(f"train.optimizer muon at train.zero_stage {t.zero_stage} needs train.grad_clip 0 (got "
                        f"{t.grad_clip}): DeepSpeed's ZeRO-{t.zero_stage} clips Muon's orthogonalized update with "
                        "the gradients, which shrinks every Muon step; or use train.zero_stage 0, which clips the "
                        "gradients before Newton-Schulz")
    if t.precision == "fp16":
        problems.append("train.optimizer muon supports train.precision fp32 and bf16, not fp16 (DeepSpeed's fp16 "
                        "Muon path is not tested here)")
    if t.offload_optimizer:
        problems.append("train.offload_optimizer supports train.optimizer adam and adamw, not muon")
    return problems


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
