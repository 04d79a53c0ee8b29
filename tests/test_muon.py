"""train.optimizer muon on real DeepSpeed engines (a one-worker gloo group, and two spawned workers):
Newton-Schulz runs on each hidden matrix and on nothing else, the step equals a hand Newton-Schulz
of the gradients (and torch.optim.Muon's), not SGD's or AdamW's, under every ZeRO stage and precision
the option accepts; and the settings it refuses, with the DeepSpeed behaviour that makes them wrong."""

import math
import re
from collections import Counter

import pytest
import yaml
import torch
import torch.distributed as dist

from llm_ray.config import ConfigError, load_config, model_spec
from llm_ray.model import GPT
from llm_ray.train.engine import (build_engine, build_model, build_optimizer, deepspeed_config, is_hidden_matrix,
                                  muon_param_groups)

pytestmark = pytest.mark.slow

# Every parameter kind has a shape of its own (wpe 48 x 64 is not the 64 x 64 attention projection,
# lm_head is untied), so the shapes Newton-Schulz ran on tell which parameters it ran for.
MODEL = ["model.context_length=48", "data.block_size=48", "model.tie_embeddings=false", "train.micro_batch_size=4"]
# Relative distance of DeepSpeed's Muon step from the float64 one: its Gram Newton-Schulz runs in fp16
# (ns_compute_dtype), and the iteration amplifies rounding along a gradient's small singular directions,
# more so when the gradient and momentum come in bf16. Measured: 0.021 (fp32), 0.048 (bf16).
NS_TOLERANCE = {"fp32": 0.05, "bf16": 0.1}


def muon_config(workers=1, accum=1, *overrides):
    tokens = 4 * 48 * workers * accum  # micro-batch x block x workers x accumulation steps
    return load_config("debug", [*MODEL, f"train.num_workers={workers}", f"train.total_batch_tokens={tokens}",
                                 "train.optimizer=muon", "train.warmup_steps=0", "train.schedule=constant",
                                 "train.grad_clip=0", *overrides])  # clipping: see the refusals below


def newton_schulz(g: torch.Tensor) -> torch.Tensor:
    """Muon's orthogonalized update of g by hand, in float64: the quintic iteration of Keller Jordan's Muon
    (5 steps), scaled by sqrt(max(1, rows / cols)) as DeepSpeed's and torch's 'original' do."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double().T if g.shape[0] > g.shape[1] else g.double()
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    x = x.T if g.shape[0] > g.shape[1] else x
    return x * math.sqrt(max(1.0, g.shape[0] / g.shape[1]))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def direction(t: torch.Tensor) -> torch.Tensor:
    return t.double() / t.double().norm()


def batches(cfg, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, cfg.vocab_size, (cfg.train.micro_batch_size, cfg.data.block_size + 1), generator=g)
            for _ in range(n)]


def reference_grads(cfg, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of the mean loss over xs on a plain model with the run's initial weights, in its precision
    (bf16 weights: bf16 gradients of each micro-batch, summed in float64)."""
    torch.manual_seed(cfg.seed)
    model = GPT(model_spec(cfg)).to(torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)
    grads = {}
    for x in xs:
        model.zero_grad()
        (model(x[:, :-1], x[:, 1:])[1] / len(xs)).backward()
        for n, p in model.named_parameters():
            grads[n] = grads.get(n, 0) + p.grad.double()
    return grads


def whole(p: torch.Tensor) -> torch.Tensor:
    """The parameter's full value in fp32 (gathered from its ZeRO-3 partitions)."""
    if hasattr(p, "ds_tensor"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().float().clone()
    return p.detach().float().clone()


def step(engine, xs: list[torch.Tensor]) -> None:
    """One optimizer step over the micro-batches xs (the engine steps on the accumulation boundary)."""
    for x in xs:
        engine.backward(engine(x[:, :-1], x[:, 1:])[1])
        engine.step()


def expected_ns_shapes(model) -> Counter:
    """One Newton-Schulz run per hidden matrix, by shape (a ZeRO-3 partition's shape is ds_shape)."""
    return Counter(tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()
                   if is_hidden_matrix(n, p))


NEWTON_SCHULZ = ("zeropower_via_gram_newtonschulz", "zeropower_via_newtonschulz5")  # DeepSpeed's two iterations


def recording(ns, calls: list):
    """ns, appending the shape of each matrix it orthogonalizes to calls."""
    def run(G, steps):
        calls.append(tuple(G.shape))
        return ns(G, steps)
    return run


@pytest.fixture(scope="module")
def ns_calls():
    """Shapes Newton-Schulz ran on. Every Muon path in DeepSpeed (the optimizer's own step, ZeRO-1/2's
    gradient partitions, ZeRO-3's sub-groups, the bf16 optimizer) reaches the two iterations through
    original_muon.muon_update, which looks them up in its module: wrapped there, once per module (muon_update
    is torch.compile'd, and recompiles when they change)."""
    from deepspeed.runtime.zero.muon import original_muon

    calls = []
    with pytest.MonkeyPatch.context() as patch:
        for name in NEWTON_SCHULZ:
            patch.setattr(original_muon, name, recording(getattr(original_muon, name), calls))
        yield calls


def test_hidden_matrices_go_to_muon_and_everything_else_to_adamw():
    cfg = muon_config()
    model = GPT(model_spec(cfg))
    groups = muon_param_groups(model, cfg.train)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [g for g in groups if g["use_muon"]]
    assert len(muon) == 1 and muon[0]["lr"] == cfg.train.muon_lr == 0.02
    assert muon[0]["momentum"] == 0.95 and muon[0]["weight_decay"] == cfg.train.weight_decay
    assert sorted(names[id(p)] for p in muon[0]["params"]) == sorted(
        f"transformer.h.{i}.{m}.weight" for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    decay, no_decay = [[names[id(p)] for p in g["params"]] for g in groups if not g["use_muon"]]
    assert decay == ["lm_head.weight"]  # a matrix, decayed, but the output layer: AdamW
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
            "transformer.h.0.attn.c_attn.bias", "transformer.h.1.ln_2.weight"} <= set(no_decay)
    # DeepSpeed's ZeRO optimizers read the tag on the parameter itself.
    assert all(p.use_muon == is_hidden_matrix(n, p) for n, p in model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # The progress rows' LR is the first group's: AdamW's train.lr, not muon_lr.
    assert groups[0]["lr"] == cfg.train.lr


@pytest.mark.parametrize("stage, precision", [(s, p) for p in ("fp32", "bf16") for s in (0, 1, 2, 3)])
def test_a_step_orthogonalizes_each_hidden_matrix_and_nothing_else(process_group, ns_calls, stage, precision):
    """One step over two accumulated micro-batches: Newton-Schulz ran once for each hidden matrix
    (counted by shape) and for nothing else; each hidden matrix moved by -muon_lr x NS(gradient) (with
    decoupled weight decay), which is neither SGD's nor AdamW's step; the rest moved as torch's AdamW
    moves them. ZeRO-0 is given a gradient clip that acts (0.1 < the gradient norm): it clips the
    gradient before Newton-Schulz, so the step is the same. ZeRO-3 builds the model inside zero.Init."""
    clip = 0.1 if stage == 0 else 0.0
    cfg = muon_config(1, 2, f"train.zero_stage={stage}", f"train.precision={precision}", f"train.grad_clip={clip}")
    xs = batches(cfg, 2)
    grads = reference_grads(cfg, xs)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    assert clip == 0 or norm > 2 * clip
    clipped = clip / (norm + 1e-6) if clip else 1.0  # DeepSpeed's clip coefficient
    model = build_model(cfg)
    if stage == 3:  # partitioned as built: each parameter's data is an empty placeholder, its shape ds_shape
        assert all(p.numel() == 0 and hasattr(p, "ds_shape") for p in model.parameters())
    engine = build_engine(model, cfg)
    if stage == 3:
        flags = engine.optimizer.sub_groups_using_muon
        assert engine.optimizer.use_muon and any(flags) and not all(flags)
    before = {n: whole(p) for n, p in model.named_parameters()}
    ns_calls.clear()
    step(engine, xs)
    after = {n: whole(p) for n, p in model.named_parameters()}

    assert Counter(ns_calls) == expected_ns_shapes(model), ns_calls  # once each; wte, wpe, lm_head never
    t = cfg.train
    # At ZeRO-0 in bf16 DeepSpeed wraps the optimizer in its FP16_UnfusedOptimizer, which steps it once on
    # zero gradients as it is built (initialize_optimizer_states): AdamW's first real step is its second.
    k = 2 if (stage, precision) == (0, "bf16") else 1
    weights = torch.bfloat16 if precision == "bf16" else torch.float32

    def stored(change: torch.Tensor, n: str) -> torch.Tensor:
        """The change as the weights can hold it: (before + change) rounded to their dtype, less before."""
        return (before[n].double() + change).to(weights).double() - before[n].double()

    for n, p in model.named_parameters():
        update = after[n] - before[n]
        if is_hidden_matrix(n, p):
            decay = -t.muon_lr * t.weight_decay * before[n]
            muon = -t.muon_lr * newton_schulz(grads[n]) + decay
            assert rel(update, stored(muon, n)) < NS_TOLERANCE[precision], n
            sgd = -t.muon_lr * grads[n]
            adam = -t.muon_lr * grads[n] / (grads[n].abs() + 1e-8)  # AdamW's first step
            assert rel(direction(update), direction(sgd)) > 0.5 and rel(direction(update), direction(adam)) > 0.5, n
        else:
            g, m = grads[n] * clipped, before[n].double()
            wd = t.weight_decay if n == "lm_head.weight" else 0.0  # the one decayed matrix AdamW has
            m_hat, v_hat = (1 - t.beta1) * g / (1 - t.beta1**k), (1 - t.beta2) * g**2 / (1 - t.beta2**k)
            adam = -t.lr * m_hat / (v_hat.sqrt() + 1e-8) - t.lr * wd * m  # AdamW's k-th step from m = v = 0
            expected = stored(adam, n)
            moved = g.abs() > 1e-6
            # AdamW's step is lr x sign(g): a gradient near zero may take the other sign in bf16 (or in
            # another summation order), which flips that element's step.
            agree = moved & (torch.sign(update) == torch.sign(expected))
            assert (moved & ~agree).sum() <= 1e-3 * moved.sum(), n
            assert rel(update[agree], expected[agree]) < (1e-3 if precision == "fp32" else 0.02), n


def test_the_step_matches_torch_muon_over_three_steps(process_group):
    """Three ZeRO-2 steps (momentum carried) against torch.optim.Muon on the hidden matrices and torch's
    AdamW on the rest, fed the same batches: the hidden matrices end within 0.05 of it (torch runs its
    Newton-Schulz in bf16, DeepSpeed in fp16: 0.037 measured; a momentum of 0.9 instead of 0.95 is 0.075
    away, no momentum 1.1, no Nesterov 0.34). The Muon group's LR follows the schedule, scaled to muon_lr."""
    cfg = muon_config(1, 1, "train.zero_stage=2", "train.grad_clip=0", "train.warmup_steps=4",
                      "train.weight_decay=0.1")
    t = cfg.train
    xs = batches(cfg, 3)
    torch.manual_seed(cfg.seed)
    ref = GPT(model_spec(cfg))
    *adam_groups, hidden = muon_param_groups(ref, t)
    muon = torch.optim.Muon(hidden["params"], lr=t.muon_lr, weight_decay=t.weight_decay, momentum=t.muon_momentum,
                            nesterov=True, adjust_lr_fn="original")
    adamw = torch.optim.AdamW(adam_groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    model = build_model(cfg)
    engine = build_engine(model, cfg)
    start = {n: whole(p) for n, p in model.named_parameters()}
    for i, x in enumerate(xs):
        scale = (i + 1) / t.warmup_steps  # lr_at during warmup, as a share of lr
        for optimizer, lr in ((muon, t.muon_lr), (adamw, t.lr)):
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            optimizer.zero_grad()
        ref(x[:, :-1], x[:, 1:])[1].backward()
        muon.step()
        adamw.step()
        assert [g["lr"] for g in engine.optimizer.param_groups if g["use_muon"]] == [pytest.approx(t.muon_lr * scale)]
        step(engine, [x])
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if is_hidden_matrix(n, p):
            assert rel(whole(p) - start[n], q.detach() - start[n]) < NS_TOLERANCE["fp32"], n


@pytest.mark.parametrize("overrides, message", [
    (["train.zero_stage=2", "train.grad_clip=1.0"],
     "train.optimizer muon at train.zero_stage 2 needs train.grad_clip 0 (got 1.0)"),
    (["train.zero_stage=1", "train.grad_clip=0.5"], "train.optimizer muon at train.zero_stage 1 needs train.grad_clip 0"),
    (["train.zero_stage=3", "train.grad_clip=1.0"], "train.optimizer muon at train.zero_stage 3 needs train.grad_clip 0"),
    (["train.zero_stage=2", "train.grad_clip=0", "train.offload_optimizer=true"],
     "train.offload_optimizer supports train.optimizer adam and adamw, not muon"),
    (["train.zero_stage=0", "train.precision=fp16", "train.use_gpu=true"],
     "train.optimizer muon supports train.precision fp32 and bf16, not fp16"),
])
def test_refused_settings_name_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):  # when the config is read: preflight, sweeps too
        muon_config(1, 1, *overrides)
    cfg = muon_config(1, 1)  # and where the engine is built, set behind validation's back (model_copy)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        k.removeprefix("train."): yaml.safe_load(v) for k, v in (o.split("=") for o in overrides)})})
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_engine(GPT(model_spec(cfg)), cfg)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_clips_the_orthogonalized_update_which_is_why_grad_clip_is_refused(process_group, stage):
    """What the refusal guards against, on DeepSpeed itself (build_engine's check bypassed), with
    gradient_clipping 1.0: clipping the gradient leaves Muon's first step as it is (Newton-Schulz
    normalizes), yet ZeRO-1/2/3 shrink it many times over, as they clip the orthogonalized update.
    Should this fail after a DeepSpeed upgrade, the refusal in check_muon can go."""
    import deepspeed

    cfg = muon_config(1, 1, f"train.zero_stage={stage}", "train.grad_clip=0", "train.weight_decay=0")
    cfg.train.grad_clip = 1.0  # refused by the config; set behind validation's back to show why
    xs = batches(cfg, 1)
    grads = reference_grads(cfg, xs)
    model = build_model(cfg)
    optimizer = build_optimizer(muon_param_groups(model, cfg.train), cfg.train)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg),
                                      dist_init_required=False)
    before = {n: whole(p) for n, p in model.named_parameters()}
    step(engine, xs)
    shrink = [float((whole(p) - before[n]).norm() / (cfg.train.muon_lr * newton_schulz(grads[n])).norm())
              for n, p in model.named_parameters() if is_hidden_matrix(n, p)]
    assert max(shrink) < 0.2, shrink


def test_zero3_turns_reduce_scatter_off_for_muon():
    """stage3.py raises "Muon and reduce scatter cannot be used together"."""
    assert deepspeed_config(muon_config(1, 1, "train.zero_stage=3", "train.grad_clip=0"))[
        "zero_optimization"]["reduce_scatter"] is False
    assert "reduce_scatter" not in deepspeed_config(
        load_config("debug", ["train.zero_stage=3"]))["zero_optimization"]


def two_worker_step(rank: int, store: str, stage: int, queue) -> None:
    """A spawned worker of a 2-process gloo group: one ZeRO step on its own micro-batch; reports the
    shapes Newton-Schulz ran on here and each hidden matrix's update against the hand Muon step on
    the gradient of both workers' micro-batches."""
    import os

    from deepspeed.runtime.zero.muon import original_muon

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    calls = []
    for name in NEWTON_SCHULZ:  # in this spawned process only
        setattr(original_muon, name, recording(getattr(original_muon, name), calls))
    cfg = muon_config(2, 1, f"train.zero_stage={stage}", "train.grad_clip=0")
    xs = batches(cfg, 2)
    grads = reference_grads(cfg, xs)
    model = build_model(cfg)
    engine = build_engine(model, cfg)
    before = {n: whole(p) for n, p in model.named_parameters()}
    step(engine, [xs[rank]])
    t = cfg.train
    errors = {n: rel(whole(p) - before[n], -t.muon_lr * (newton_schulz(grads[n]) + t.weight_decay * before[n]))
              for n, p in model.named_parameters() if is_hidden_matrix(n, p)}
    queue.put((rank, calls, errors, expected_ns_shapes(model)))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_orthogonalize_the_reduced_gradient(tmp_path, stage):
    """Two workers (the default train.num_workers) each hold part of the optimizer state: every hidden
    matrix still moves by the Muon step of the gradient averaged over both workers' micro-batches, and
    Newton-Schulz ran, on one worker or both, for each hidden matrix and for nothing else."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(two_worker_step, args=(str(tmp_path / "store"), stage, queue), nprocs=2)
    results = [queue.get() for _ in range(2)]
    expected = results[0][3]
    ran = Counter()
    for _, calls, errors, _ in results:
        ran.update(calls)
        assert max(errors.values()) < NS_TOLERANCE["fp32"], errors
    assert set(ran) == set(expected) and all(ran[s] >= expected[s] for s in expected), ran


def test_memory_estimate_counts_muon_momentum_on_the_hidden_matrices_only():
    from llm_ray.sweep.memory import count_muon_parameters, count_parameters, estimate_memory

    cfg = load_config("debug", ["train.optimizer=muon", "train.zero_stage=0", "train.grad_clip=0"])
    params, matrices = count_parameters(cfg), count_muon_parameters(cfg)
    assert matrices == 12 * cfg.model.n_layer * cfg.model.n_embd**2  # attention 4 d^2, MLP 8 d^2 per block
    assert estimate_memory(cfg).optimizer == 4 * matrices + 8 * (params - matrices)
    zero2 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"zero_stage": 2})})
    assert estimate_memory(zero2).optimizer == (8 * matrices + 8 * (params - matrices)) // 2  # staged copy, 2 workers
