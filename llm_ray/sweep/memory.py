"""Memory pre-flight: what one training worker will need, estimated from its config alone.

A sweep checks every trial against the worker's memory before it launches any worker, so a
trial that cannot fit is skipped in milliseconds instead of failing after minutes of set-up.

Per worker, with N workers, P parameters and ZeRO stage s (DeepSpeed's partitioning):

    weights      4 bytes/param (bf16: 2), divided by N at stage 3
    gradients    4 bytes/param (bf16: 2), divided by N at stage >= 2
    optimizer    Adam: m and v, 8 bytes/param; SGD: momentum, 4 (0 without momentum); Muon: momentum,
                 4 per param of the hidden matrices (8 at stage 1-2, which stage a copy of it each
                 step), and Adam's 8 for the rest; bf16 adds fp32 master weights and fp32 gradients
                 (8 more); divided by N at stage >= 1
    buckets      ZeRO-2/3 gradient reduction buffers: 2 x reduce_bucket_size elements (on a CPU
                 worker, only the pages written count: at most one element per parameter)
    transients   the gradients flattened once more for the all-reduce and clipping, and fp32
                 temporaries of the optimizer step (1 x gradients + 4 bytes/param, partitioned
                 like them)
    activations  per token of the micro-batch, per layer, the tensors autograd keeps for the
                 backward pass of our GPT block (see ``layer_elements``), plus one block's worth
                 of gradients alive during its backward pass; with activation checkpointing only
                 each block's input is kept, and three blocks' worth are alive while one block is
                 recomputed and back-propagated. Plus the final norm, the logits, their
                 log-softmax and their gradient.
    runtime      the process itself: torch, DeepSpeed and Ray on a CPU worker, the CUDA context,
                 cuBLAS workspace and NCCL buffers on a GPU (RUNTIME_BYTES, a measured allowance)

tests/test_memory.py holds the estimate within 25% of the peak resident memory measured over
real DeepSpeed steps on a CPU (two variants: fp32/AdamW/ZeRO-0 and bf16/SGD/ZeRO-2 with activation
checkpointing; it came out 9% and 19% low). GPU peaks (torch.cuda.max_memory_allocated) are not
yet measured against it.

Offloaded optimizer state (and parameters) leave the GPU for host memory; on a CPU-only worker
host memory is the worker's memory, so they still count. Attention uses PyTorch's fused
scaled-dot-product kernels, which keep no T x T matrix; with dropout > 0 on a CPU the math
kernel may run instead, which this estimate does not model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from llm_ray.config import Config, model_spec
from llm_ray.memory import gpu_total_bytes
from llm_ray.model import GPT
from llm_ray.train.engine import is_hidden_matrix, reduce_bucket_elements

GIB = 1024**3
# The CPU figure: a Ray Train worker training the debug model (whose own parts are ~14 MB) peaked at
# 588 MB resident (tests/test_memory.py holds it to 25%). The GPU one is not measured yet.
RUNTIME_BYTES = {"cpu": int(0.55 * GIB), "gpu": int(1.5 * GIB)}


@dataclass
class MemoryEstimate:
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    buckets: int
    transients: int
    activations: int
    runtime: int
    offloaded: int  # bytes of the above held in host memory instead of the GPU (GPU runs only)

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.buckets + self.transients

    @property
    def total(self) -> int:
        """Bytes on the worker's device (its GPU, or the host for a CPU worker)."""
        return self.model_states + self.activations + self.runtime - self.offloaded

    def describe(self) -> str:
        gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
        return (f"{gib(self.total)} GiB per worker ({self.parameters / 1e6:.1f}M parameters: weights "
                f"{gib(self.weights)}, gradients {gib(self.gradients)}, optimizer {gib(self.optimizer)}, "
                f"activations {gib(self.activations)}, runtime {gib(self.runtime)}"
                + (f", {gib(self.offloaded)} offloaded to the host" if self.offloaded else "") + ")")

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def count_parameters(cfg: Config) -> int:
    """Parameters of the configured model, built on the meta device (no memory, no init cost)."""
    import torch

    with torch.device("meta"):
        model = GPT(model_spec(cfg))
    return sum(p.numel() for p in model.parameters())  # a tied weight is listed once


def count_muon_parameters(cfg: Config) -> int:
    """Parameters that train.optimizer muon updates with Muon (the hidden matrices), on the meta device."""
    import torch

    with torch.device("meta"):
        model = GPT(model_spec(cfg))
    return sum(p.numel() for name, p in model.named_parameters() if is_hidden_matrix(name, p))


def layer_elements(cfg: Config) -> tuple[int, int]:
    """Activation elements autograd keeps per token of one block: (kept at 4 bytes under autocast,
    the rest). Norm inputs 2d, and the query/key norms' inputs 2d more (qk_norm); attention: QKV input
    d, q, k, v 3d, attention output and its projection's input 2d; rotary embeddings copy q and k (2d);
    MLP: its input d, then GELU's input and output 2 x 4d (squared ReLU: the ReLU's output and its
    square, also 2 x 4d), or SwiGLU's gate and value, activation and product 4 x hidden."""
    d = cfg.model.n_embd
    spec = model_spec(cfg)
    norms = 2 * d + (2 * d if spec.qk_norm else 0)
    attention = 6 * d + (2 * d if spec.pos_encoding == "rope" else 0)
    if spec.mlp == "swiglu":
        hidden = 8 * ((int(8 * d / 3) + 7) // 8)
        mlp = d + 4 * hidden
    else:
        mlp = d + 8 * d
    return norms, attention + mlp


def activation_bytes(cfg: Config) -> int:
    t, d = cfg.train, cfg.model.n_embd
    tokens = t.micro_batch_size * cfg.data.block_size
    wide, narrow = layer_elements(cfg)
    autocast = t.autocast_bf16 is True or (t.autocast_bf16 == "auto" and t.use_gpu)  # "auto" is on on GPUs
    element = 2 if t.precision in ("bf16", "fp16") or autocast else 4
    wide_element = 4 if autocast else element  # autocast keeps norms in fp32
    per_layer = wide * wide_element + narrow * element
    if t.activation_checkpointing:  # each block's input is kept; one block at a time is recomputed
        layers = cfg.model.n_layer * d * element + 3 * per_layer
    else:
        layers = (cfg.model.n_layer + 1) * per_layer
    head = 2 * d * element + 3 * cfg.vocab_size * 4  # final norm, logits, log-softmax, their gradient (fp32)
    if cfg.model.logit_softcap is not None:
        head += cfg.vocab_size * element  # the cap's tanh output, kept for its backward
    return tokens * (layers + head)


def estimate_memory(cfg: Config) -> MemoryEstimate:
    t = cfg.train
    params = count_parameters(cfg)
    n, stage = t.min_workers, t.zero_stage  # the fewest workers hold the largest shares
    half = t.precision in ("bf16", "fp16")
    weights = params * (2 if half else 4) // (n if stage == 3 else 1)
    gradients = params * (2 if half else 4) // (n if stage >= 2 else 1)
    if t.optimizer == "sgd":
        state = params * (4 if t.momentum > 0 else 0)
    elif t.optimizer == "muon":
        matrices = count_muon_parameters(cfg)
        state = matrices * (8 if stage in (1, 2) else 4) + (params - matrices) * 8
    else:
        state = params * 8
    if half:
        state += params * 8  # fp32 master weights and fp32 gradients
    optimizer = state // (n if stage >= 1 else 1)
    # A bucket is allocated whole (what a GPU's allocator counts), but a CPU process's memory holds
    # only the pages written, at most one gradient per parameter.
    bucket = reduce_bucket_elements(cfg) if t.use_gpu else min(reduce_bucket_elements(cfg), params)
    buckets = 2 * bucket * (2 if half else 4) if stage >= 2 else 0
    transients = gradients + params * 4 // (n if stage >= 1 else 1)
    offloaded = 0
    if t.use_gpu and t.offload_optimizer:
        offloaded += optimizer
    if t.use_gpu and t.offload_params:
        offloaded += weights
    return MemoryEstimate(
        parameters=params, weights=weights, gradients=gradients, optimizer=optimizer, buckets=buckets, transients=transients,
        activations=activation_bytes(cfg), runtime=RUNTIME_BYTES["gpu" if t.use_gpu else "cpu"],
        offloaded=offloaded,
    )


def cluster_memory(may_use_gpu: bool, gpu_timeout_s: float = 300) -> dict:
    """What a worker's memory estimate is compared against, read from the Ray cluster this process
    joined: the largest live node's memory and CPUs, and one GPU's memory when GPUs may be used
    (asked of a task holding one GPU for a moment, within gpu_timeout_s)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest = max(nodes, key=lambda n: n["Resources"].get("memory", 0), default=None)
    memory = {"node": int(largest["Resources"].get("memory", 0)) if largest else None,
              "node_cpus": largest["Resources"].get("CPU", 1) if largest else 1}
    if may_use_gpu and ray.cluster_resources().get("GPU"):

        probe = ray.remote(num_gpus=1)(gpu_total_bytes).remote()
        try:  # a busy cluster may have no GPU free now: the budget is then unknown, not a failure
            memory["gpu"] = ray.get(probe, timeout=gpu_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(probe, force=True)
    return memory


def worker_budget(memory: dict, cfg: Config, concurrent_runs: int = 1) -> int | None:
    """Bytes one training worker may use: memory["per_worker"] when set, else the GPU's memory,
    else the largest node's memory shared by the workers (of concurrent_runs runs) it can hold at once."""
    if memory.get("per_worker"):
        return memory["per_worker"]
    t = cfg.train
    if t.use_gpu:
        return memory.get("gpu")
    if not memory.get("node"):
        return None
    fit_by_cpus = max(1, math.floor(memory["node_cpus"] / t.cpus_per_worker))
    sharing = max(1, min(t.max_workers * concurrent_runs, fit_by_cpus))
    return memory["node"] // sharing
