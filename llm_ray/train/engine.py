"""Wrapping a plain model in DeepSpeed, from the config: the one place that builds the engine."""

from __future__ import annotations

import torch
import torch.distributed as dist

from llm_ray.config import Config, ConfigError, TrainConfig, model_spec
from llm_ray.config.train import muon_problems
from llm_ray.model import GPT
from llm_ray.train.schedule import lr_at


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm weights and embeddings go in a no-decay group."""
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        is_embedding = name.endswith(("wte.weight", "wpe.weight"))
        dims = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition is flat: its full shape is ds_shape
        (decay if dims >= 2 and not is_embedding else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (attention and MLP projections): what Muon updates."""
    return name.startswith("transformer.h.") and len(getattr(param, "ds_shape", param.shape)) == 2


def muon_param_groups(model: torch.nn.Module, t: TrainConfig) -> list[dict]:
    """AdamW groups (param_groups less the hidden matrices), then one Muon group of the hidden matrices.

    Every parameter is tagged ``use_muon``: DeepSpeed's ZeRO-1/2/3 and bf16 optimizers read the tag
    on the parameter, not the group, to decide where Newton-Schulz runs. Tagged here rather than by
    DeepSpeed's own optimizer config, which tags by name ("embed", "lm_head") and would put our
    embeddings (``transformer.wte``, ``wpe``) on Muon.
    """
    hidden = [p for name, p in model.named_parameters() if p.requires_grad and is_hidden_matrix(name, p)]
    muon_ids = {id(p) for p in hidden}
    groups = []
    for group in param_groups(model, t.weight_decay):
        rest = [p for p in group["params"] if id(p) not in muon_ids]
        if rest:
            groups.append({**group, "params": rest, "use_muon": False, "lr": t.lr, "betas": (t.beta1, t.beta2),
                           "eps": 1e-8})
    groups.append({"params": hidden, "use_muon": True, "lr": t.muon_lr, "momentum": t.muon_momentum,
                   "weight_decay": t.weight_decay})
    for group in groups:
        for p in group["params"]:
            p.use_muon = group["use_muon"]
    return groups


def check_muon(t: TrainConfig) -> None:
    """Refuse the settings under which DeepSpeed's Muon would not train as Muon (tests/test_muon.py shows each).

    ZeRO-1/2/3 run Newton-Schulz inside their gradient reduction and then take the clipping norm
    over the result (stage_1_and_2.py step(): "the clip covers the orthogonalized gradient";
    stage3.py _apply_muon_to_accumulated_grads: "before the norm, which keeps being taken over the Muon
    update"): with train.grad_clip > 0 every Muon step shrinks by the norm of all the
    orthogonalized updates (x30 on the debug model) whatever the gradients. ZeRO-0 clips the
    gradients first and orthogonalizes in the optimizer's step, as Muon is defined. The grad_norm
    that progress rows report under ZeRO-1/2/3 is that norm too, not the gradients'.
    """
    problems = muon_problems(t)
    if problems:
        raise ConfigError("\n  ".join(problems))


def reduce_bucket_elements(cfg: Config) -> int:
    """Gradient elements per ZeRO-2/3 reduction bucket: n_embd^2 (Hugging Face's "auto"), at least 5e6.

    DeepSpeed's default (5e8 elements, 2 GB in fp32) is meant for billion-parameter models, and a
    bucket's pages stay resident once written. n_embd^2 alone is too small for small models: the
    demo's (36,864 elements) cut a step's reduction into 71 collectives, and 2 workers ran at 0.83x
    a plain DDP loop; with at least 5e6 (20 MB in fp32, about DDP's 25 MB buckets) at 0.91x
    (benchmarks/train_throughput.py --overhead-only)."""
    return max(cfg.model.n_embd**2, 5 * 10**6)


def deepspeed_config(cfg: Config, load_universal: bool = False, workers: int | None = None) -> dict:
    """The DeepSpeed JSON for cfg: generated, never written by hand.

    load_universal: the checkpoint to load is in DeepSpeed's universal format (see to_universal).
    workers: the workers training (default train.max_workers; an elastic run's count varies): the
    accumulation steps follow it, so that the global batch stays train.total_batch_tokens.
    """
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage >= 2:
        h = cfg.model.n_embd
        zero.update(reduce_bucket_size=reduce_bucket_elements(cfg), allgather_bucket_size=max(h * h, 5 * 10**7))
        if t.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=int(0.9 * h * h), stage3_param_persistence_threshold=10 * h,
                        # About one transformer block (12 h^2 parameters) gathered at a time: DeepSpeed's
                        # defaults (1e9) keep every gathered parameter until the step ends, which on a
                        # model this size is the whole model again.
                        stage3_max_live_parameters=12 * h * h, stage3_max_reuse_distance=12 * h * h)
            if t.optimizer == "muon":
                zero["reduce_scatter"] = False  # stage3.py: "Muon and reduce scatter cannot be used together"
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    workers = workers or t.max_workers  # an elastic run's workers pass their count
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.accum_steps(workers),
        "train_batch_size": t.micro_batch_size * cfg.accum_steps(workers) * workers,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # SGD is a plain torch optimizer; ZeRO shards it fine
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # we print our own progress
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def build_model(cfg: Config) -> GPT:
    """The model with its initial weights drawn from cfg.seed (the same on every worker).

    Under ZeRO-3 it is built inside ``deepspeed.zero.Init``: each module's parameters are partitioned
    over the workers as soon as the module exists, so no worker ever holds the whole model. The
    initial values are then drawn one parameter at a time (gathered, drawn on every rank from the
    same generator, kept from rank 0), so they equal those of a plain build with the same seed.
    """
    import deepspeed

    torch.manual_seed(cfg.seed)
    spec = model_spec(cfg)
    if cfg.train.zero_stage != 3:
        return GPT(spec)
    import torch.distributed as dist

    # DeepSpeed's communication layer over the process group Ray Train (or a test) started.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, workers=world_size()), mem_efficient_linear=False):
        model = GPT(spec)  # its constructor's draws land on empty partitions: drawn again below
    for param, init in model.initializers():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            init(param)
    return model


def parameter_share(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter elements this worker holds, elements of the whole model); tied weights count once.
    Under ZeRO-3 a worker holds its partition of each parameter (ds_tensor), else all of it."""
    held = total = 0
    for p in model.parameters():
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        total += getattr(p, "ds_numel", p.numel())
    return held, total


def build_optimizer(groups: list[dict], t: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer over param groups; DeepSpeed's CPU Adam when its state is offloaded to the CPU."""
    if t.optimizer == "muon":
        # DeepSpeed's Muon: Newton-Schulz runs in its ZeRO-1/2/3 optimizers (on the reduced gradient)
        # or, at ZeRO-0, in this optimizer's step (on the clipped fp32 gradient); the AdamW half is
        # torch's fused AdamW, stepped from this optimizer's step.
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

        return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW, adam_optimizer_kwargs={"fused": True})
    if t.optimizer == "sgd":
        if t.offload_optimizer:
            raise ValueError("train.offload_optimizer supports adam and adamw, not sgd")
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov)
    if t.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=(t.beta1, t.beta2), adamw_mode=t.optimizer == "adamw")
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel for the whole update, on CPU as on GPU (1.3x the steps/s of the default
    # multi-tensor path on a small model here, where the update is a large share of a step).
    return cls(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=True)


def world_size() -> int | None:
    """The workers of this process group (None outside one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else None


def build_engine(model: torch.nn.Module, cfg: Config, load_universal: bool = False):
    """DeepSpeed engine around model, with the configured optimizer and LR schedule (stepped per optimizer step)."""
    import deepspeed

    t = cfg.train
    check_muon(t)
    groups = muon_param_groups(model, t) if t.optimizer == "muon" else param_groups(model, t.weight_decay)
    optimizer = build_optimizer(groups, t)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, t) / t.lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(cfg, load_universal, world_size()),
        dist_init_required=False,  # Ray Train already set up the process group
    )
    return engine


# Saved with every DeepSpeed checkpoint so that DeepSpeed's converter accepts it (a plain model:
# no tensor- or pipeline-parallel layout to describe).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def to_universal(ds_dir: str, tag: str, out_dir: str) -> None:
    """Convert ds_dir/tag (ZeRO shards of N workers) to DeepSpeed's universal checkpoint in
    out_dir/tag, whose optimizer state loads under any worker count."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", f"{ds_dir}/{tag}",
         "--output_folder", f"{out_dir}/{tag}", "--num_extract_workers", "1", "--num_merge_workers", "1"],
        capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"converting the checkpoint {ds_dir}/{tag} for a new worker count failed:\n"
                           + done.stdout[-2000:] + done.stderr[-2000:])
