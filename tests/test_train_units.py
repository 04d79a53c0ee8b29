import numpy as np
import pytest
import torch

from llm_ray.config import load_config, model_spec
from llm_ray.model import GPT
from llm_ray.train.engine import deepspeed_config, param_groups
from llm_ray.train.schedule import lr_at


def schedule(name, **kw):
    from llm_ray.config import TrainConfig

    return TrainConfig(schedule=name, lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, **kw)


def test_cosine_schedule_warms_up_then_decays_to_min():
    t = schedule("cosine")
    lrs = [lr_at(s, t) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rising
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))  # falling
    assert lrs[60] == pytest.approx(0.55)  # half-way through the cosine
    assert lrs[110:] == [pytest.approx(0.1)] * 10


def test_other_schedules():
    linear = [lr_at(s, schedule("linear")) for s in range(111)]
    assert linear[60] == pytest.approx(0.55) and linear[110] == pytest.approx(0.1)
    assert all(lr_at(s, schedule("constant")) == 1.0 for s in range(10, 200))
    inv = [lr_at(s, schedule("inverse_sqrt")) for s in (9, 39, 159)]
    assert inv == [pytest.approx(1.0), pytest.approx(0.5), pytest.approx(0.25)]
    wsd = [lr_at(s, schedule("wsd", decay_fraction=0.2)) for s in range(111)]
    assert wsd[10:88] == [1.0] * 78  # stable until the last 20% (22 steps)
    assert wsd[88] == pytest.approx(1.0) and wsd[99] == pytest.approx(0.55) and wsd[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(wsd[88:], wsd[89:]))


def test_no_decay_groups():
    model = GPT(model_spec(load_config("debug")))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in decayed)
    assert "transformer.wte.weight" in {names[id(p)] for p in no_decay["params"]}
    n_total = sum(p.numel() for p in model.parameters())  # tied weight counted once
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_total


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_is_derived(stage):
    cfg = load_config("demo", [f"train.zero_stage={stage}", "train.total_batch_tokens=16384"])
    ds = deepspeed_config(cfg)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    # Buckets of n_embd^2 elements (Hugging Face's "auto"), at least 5e6 (the demo's 192^2 would cut a step's
    # reduction into 71 collectives), not DeepSpeed's 5e8-element defaults.
    # ZeRO-2 and -3 only (stages 0 and 1 have no gradient buckets): the key is there exactly then.
    assert zero.get("reduce_bucket_size") == (5 * 10**6 if stage >= 2 else None)
    wide = deepspeed_config(load_config("demo", [f"train.zero_stage={stage}", "model.n_embd=4096", "model.n_head=32"]))
    assert wide["zero_optimization"].get("reduce_bucket_size") == (4096 * 4096 if stage >= 2 else None)
    assert ("stage3_prefetch_bucket_size" in zero) == (stage == 3)
    assert ds["checkpoint"] == {"load_universal": False}
    # 16384 tokens / (16 sequences x 128 tokens x 2 workers) = 4 accumulation steps
    assert ds["gradient_accumulation_steps"] == 4 == cfg.grad_accum_steps
    assert ds["train_batch_size"] == 16 * 4 * 2
    # one worker of an elastic run: twice the accumulation, the same global batch
    alone = deepspeed_config(cfg, workers=1)
    assert alone["gradient_accumulation_steps"] == 8 and alone["train_batch_size"] == 16 * 4 * 2
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_offload_and_precision_in_the_deepspeed_config():
    ds = deepspeed_config(load_config("demo", ["train.zero_stage=3", "train.optimizer=adamw", "train.offload_optimizer=true",
                                                "train.offload_params=true"]))
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert deepspeed_config(load_config("gpt2-124m"))["bf16"]["enabled"] is True
    fp16 = deepspeed_config(load_config("gpt2-124m", ["train.precision=fp16"]))["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.parametrize("override, message", [
    (["train.precision=fp16"], "needs train.use_gpu"),
    (["train.offload_params=true"], "needs train.zero_stage 3"),
    (["train.zero_stage=0", "train.offload_optimizer=true"], "needs train.zero_stage 1, 2 or 3"),
    (["train.autocast_bf16=true", "train.precision=bf16"], "autocast_bf16 works with train.precision fp32"),
    (["train.total_batch_tokens=5000"], "must be a multiple of"),
])
def test_training_config_errors_name_the_fields(override, message):
    from llm_ray.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("demo", override)


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                       ("sgd", torch.optim.SGD)])
def test_optimizers(name, cls):
    from llm_ray.train.engine import build_optimizer

    cfg = load_config("debug", [f"train.optimizer={name}", "train.nesterov=true"])
    model = GPT(model_spec(cfg))
    opt = build_optimizer(param_groups(model, cfg.train.weight_decay), cfg.train)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.train.weight_decay, 0.0]
    if name == "sgd":
        assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9


def test_split_block_shifts_targets():
    from llm_ray.train.loop import split_block

    x, y = split_block(torch.arange(10, dtype=torch.int16).view(2, 5), "cpu")
    assert x.dtype == torch.long and x.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert y.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]


def test_loss_guard_rejects_nan_and_spikes_on_the_device_and_gives_up():
    from llm_ray.train.loop import LossGuard, poisoned

    guard = LossGuard(spike_factor=3.0, max_skipped=2, device="cpu", warmup=5)
    assert not guard.rejected(torch.tensor(9.0))  # no spike verdict before the warmup
    for _ in range(5):
        guard.record(True, torch.tensor(2.0), 1, ours=False)
    assert float(guard.mean) == pytest.approx(2.0)
    assert guard.rejected(torch.tensor(float("nan"))) and guard.rejected(torch.tensor(7.0))  # 7 > 3 x 2
    assert not guard.rejected(torch.tensor(5.0))  # high but under the factor
    guard.record(True, torch.tensor(4.0), 1, ours=False)
    assert float(guard.mean) == pytest.approx(0.98 * 2.0 + 0.02 * 4.0)  # the running mean moves
    guard.record(False, torch.tensor(1.0), 4, ours=False)  # fp16's loss scaler discarded it: not counted
    guard.record(False, torch.tensor(1.0), 2, ours=True)
    assert guard.skipped == 2
    with pytest.raises(RuntimeError, match="train.max_skipped_batches"):
        guard.record(False, torch.tensor(1.0), 1, ours=True)

    weight = torch.ones(3, requires_grad=True)
    poisoned((weight * 2).sum(), torch.tensor(True)).backward()
    assert torch.isnan(weight.grad).all()  # a rejected micro-batch's gradients mark the step
    weight.grad = None
    poisoned((weight * 2).sum(), torch.tensor(False)).backward()
    assert weight.grad.tolist() == [2.0, 2.0, 2.0]


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = load_config("debug")
    torch.manual_seed(0)
    plain = GPT(model_spec(cfg))
    checkpointed = GPT(model_spec(cfg))
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing = True
    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    for model in (plain, checkpointed):
        model(idx, idx.roll(1, dims=1))[1].backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


# --- the global block order (exact resume) -------------------------------------------------------


def packed(tmp_path, sizes=(5, 3, 9)):
    from llm_ray.train.data import PackedBlocks

    paths, start = [], 0
    for i, n in enumerate(sizes):  # block k holds the value k everywhere
        path = tmp_path / f"shard{i}.npy"
        np.save(path, np.repeat(np.arange(start, start + n, dtype=np.uint16)[:, None], 4, axis=1))
        paths.append(path)
        start += n
    return PackedBlocks(paths)


def step_blocks(blocks, order, position: int, world: int, micro: int, accum: int) -> list[int]:
    """Every block one optimizer step trains on, over all workers, from a stream position."""
    from llm_ray.train.data import MicroBatches

    workers = [MicroBatches(blocks, order, position, r, world, micro) for r in range(world)]
    return sorted(int(b[0]) for _ in range(accum) for w in workers for b in next(w))


def test_prefetched_batches_are_read_ahead_in_a_thread_and_are_the_same(tmp_path):
    """train.prefetch_batches: the rounds after the one handed out are read by a background thread, through
    `prepare`; the batches, their order (across an epoch edge) and the position are those of plain reads."""
    import threading
    import time

    from llm_ray.train.data import BlockOrder, MicroBatches

    blocks = packed(tmp_path)  # 17 blocks
    reads = []  # (position's first block, thread) of every read
    take = blocks.take

    def recording_take(indices):
        reads.append((int(indices[0]), threading.current_thread().name))
        return take(indices)

    blocks.take = recording_take
    plain = MicroBatches(blocks, BlockOrder(17, seed=1), 3, 1, 2, 2)
    expected = [next(plain).copy() for _ in range(6)]  # 6 rounds of 2 workers x 2 blocks: past block 17
    reads.clear()
    ahead = MicroBatches(blocks, BlockOrder(17, seed=1), 3, 1, 2, 2, prefetch=2, prepare=lambda b: b * 2)
    first = next(ahead)
    for _ in range(1000):  # wait for the two reads ahead (not a timing assertion: they just have to happen)
        if len(reads) == 3:
            break
        time.sleep(0.01)
    assert len(reads) == 3 and all(name.startswith("llm-ray-batches") for _, name in reads)
    got = [first] + [next(ahead) for _ in range(5)]
    assert all(np.array_equal(g, 2 * e) for g, e in zip(got, expected))
    assert ahead.position == plain.position == 3 + 6 * 4
    ahead.close()
    assert np.array_equal(next(ahead), next(plain) * 2)  # closed: plain reads from the same position on


def test_block_order_is_a_seeded_permutation_per_epoch():
    from llm_ray.train.data import BlockOrder

    order = BlockOrder(17, seed=3)
    first, second = order.blocks(0, 17), order.blocks(17, 17)
    assert sorted(first) == sorted(second) == list(range(17)) and list(first) != list(second)
    assert list(BlockOrder(17, seed=3).blocks(10, 20)) == list(order.blocks(10, 20))  # across the epoch edge
    assert list(BlockOrder(17, seed=4).blocks(0, 17)) != list(first)
    assert list(BlockOrder(17, seed=3, shuffle=False).blocks(15, 4)) == [15, 16, 0, 1]
    assert order.epoch_at(33) == 1 and order.epoch_at(34) == 2


def test_each_step_trains_on_the_same_blocks_whatever_the_worker_count(tmp_path):
    from llm_ray.train.data import BlockOrder

    blocks = packed(tmp_path)
    assert len(blocks) == 17 and [int(b[0]) for b in blocks.take(np.array([16, 0, 5, 7]))] == [16, 0, 5, 7]
    order = BlockOrder(len(blocks), seed=0)
    micro, global_batch = 2, 8
    for step in range(6):  # crosses epoch boundaries (17 blocks per epoch)
        per_world = [step_blocks(blocks, order, step * global_batch, world, micro, global_batch // (world * micro))
                     for world in (1, 2, 4)]
        assert per_world[0] == per_world[1] == per_world[2] == sorted(order.blocks(step * global_batch, global_batch))


def test_resuming_at_a_position_continues_with_the_next_unseen_block(tmp_path):
    from llm_ray.train.data import BlockOrder, MicroBatches

    blocks = packed(tmp_path)
    order = BlockOrder(len(blocks), seed=1)
    straight = [MicroBatches(blocks, order, 0, r, 2, 3) for r in range(2)]
    seen = [int(b[0]) for _ in range(4) for w in straight for b in next(w)]
    assert straight[0].position == straight[1].position == 24
    # Stop after 2 rounds, resume from the saved position with one worker and twice the rounds.
    first = [MicroBatches(blocks, order, 0, r, 2, 3) for r in range(2)]
    part = [int(b[0]) for _ in range(2) for w in first for b in next(w)]
    resumed = MicroBatches(blocks, order, first[0].position, 0, 1, 3)
    rest = [int(b[0]) for _ in range(4) for b in next(resumed)]
    assert part + rest == seen == list(order.blocks(0, 24))  # nothing skipped, nothing repeated


def test_validation_blocks_do_not_depend_on_the_worker_count(tmp_path):
    from llm_ray.train.data import validation_batches

    blocks = packed(tmp_path)
    for count in (6, 11, 100):
        samples = []
        for world in (1, 2, 3):
            per_worker = [validation_batches(blocks, count, 5, r, world, micro=2) for r in range(world)]
            # the same number of forward passes on every worker (ZeRO-3 collectives), padding weighs 0
            assert len({len(batches) for batches in per_worker}) == 1
            assert all(len(b) <= 2 for batches in per_worker for b, _ in batches)
            samples.append(sorted(int(x[0]) for batches in per_worker for b, w in batches if w for x in b))
        assert samples[0] == samples[1] == samples[2] and len(samples[0]) == min(count, 17)
        assert len(set(samples[0])) == len(samples[0])


@pytest.mark.parametrize("uri", ["gs://bucket/runs", "s3://bucket/../runs", "s3://key@bucket/runs",
                                 "builtin:shakespeare"])
def test_checkpoint_storage_uris_are_checked(uri):
    from llm_ray.config import ConfigError
    from llm_ray.train.trainer import checkpoint_storage

    with pytest.raises(ConfigError, match="train.storage_path"):
        checkpoint_storage(load_config("debug", [f"train.storage_path={uri}"]))


def test_checkpoint_storage_defaults_to_the_run_folder(tmp_path):
    from llm_ray.train.trainer import checkpoint_storage

    cfg = load_config("debug", [f"output_dir={tmp_path}"])
    assert checkpoint_storage(cfg) == (str(cfg.run_dir / "checkpoints"), None)
    elsewhere = load_config("debug", [f"train.storage_path={tmp_path / 'ckpt'}"])
    assert checkpoint_storage(elsewhere) == (str(tmp_path / "ckpt"), None)


def test_resumes_that_would_go_wrong_are_refused():
    from llm_ray.config import ConfigError
    from llm_ray.checkpoint import TrainState
    from llm_ray.train.resume import check_resumable

    cfg = load_config("debug", ["train.zero_stage=2"])
    saved_config = cfg.model_dump(mode="json")
    saved = TrainState(step=40, world_size=2, data_key="pack-abc")
    check_resumable(saved, saved_config, cfg, "pack-abc", world=1, tokenizer_json="t", saved_tokenizer="t")  # fine

    def refused(match, saved_config=saved_config, cfg=cfg, data_key="pack-abc", world=2, tokenizer="t"):
        with pytest.raises(ConfigError, match=match):
            check_resumable(saved, saved_config, cfg, data_key, world, tokenizer_json=tokenizer, saved_tokenizer="t")

    def changed(*overrides):
        return load_config("debug", ["train.zero_stage=2", *overrides])

    refused("train.zero_stage=3", saved_config={**saved_config, "train": {**saved_config["train"], "zero_stage": 3}})
    refused("other prepared data", data_key="pack-new")
    refused("seed=1337 \\(now 7\\)", cfg=changed("seed=7"))
    refused("train.shuffle=True", cfg=changed("train.shuffle=false"))
    refused("data.block_size=64", cfg=changed("data.block_size=32"))
    refused("train.precision=fp32", cfg=changed("train.precision=bf16"))
    refused("another tokenizer", tokenizer="other")
    zero3 = changed("train.zero_stage=3")
    zero3_config = zero3.model_dump(mode="json")
    check_resumable(saved, zero3_config, zero3, "pack-abc", world=2)
    refused("train.num_workers=2", saved_config=zero3_config, cfg=zero3, world=1)


def test_sharded_optimizer_state_is_repartitioned_under_another_worker_count(tmp_path):
    """Decided from the checkpoint's files: per-worker optimizer shards (ZeRO 1-3, DeepSpeed's
    partitioned bf16 optimizer) are re-partitioned; a whole state (ZeRO-0, fp32 or bf16) is not."""
    from llm_ray.train.resume import regroups

    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert not regroups(tmp_path, 2, 1)
    (tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert regroups(tmp_path, 2, 1)
    assert not regroups(tmp_path, 2, 2)
    assert not regroups(tmp_path, 0, 1)  # state of an old version: no worker count recorded


def test_deprecated_collective_warnings_are_silenced():
    """ZeRO-3 calls reduce_scatter_tensor at every step: one FutureWarning line per step otherwise."""
    import warnings

    import torch.distributed as dist

    from llm_ray.train.worker import quiet_deprecated_collectives

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_deprecated_collectives()
        for collective in (dist.reduce_scatter_tensor, dist.all_gather_into_tensor):
            try:
                collective(torch.zeros(2), torch.zeros(2))  # no process group: fails after the warning
            except (RuntimeError, ValueError):
                pass
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_autocast_auto_follows_the_hardware(monkeypatch):
    """train.autocast_bf16 "auto": on a CPU with AMX tiles (this machine's kind), off on one without; on a
    CUDA GPU with bf16; True and False as set. Anything else is refused, naming the field."""
    from llm_ray.config import ConfigError
    from llm_ray.train.loop import bf16_autocast

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert bf16_autocast("auto", cpu) and bf16_autocast(True, cpu) and not bf16_autocast(False, cpu)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not bf16_autocast("auto", cpu) and bf16_autocast(True, cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert bf16_autocast("auto", torch.device("cuda"))
    assert load_config("demo").train.autocast_bf16 == "auto"
    with pytest.raises(ConfigError, match="train.autocast_bf16"):
        load_config("debug", ["train.autocast_bf16=sometimes"])
