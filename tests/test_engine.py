"""LR schedules against a plain reference, and the weight-decay groups."""

import math

import pytest
import torch

from titans_train.config import Config
from titans_train.engine import AdamW, clip_split, deepspeed_config, lr_at, param_groups
from titans_train.models import ModelConfig, TitansLM


def ds_config(cfg, world_size: int) -> dict:
    return deepspeed_config(cfg.zero, cfg.train, cfg.optim.grad_clip, world_size)


def reference_lr(step, lr, min_lr, warmup, total, schedule, decay_fraction):
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = (step - warmup) / (total - warmup)
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2
    decay_start = total - int(round(decay_fraction * total))
    if step < decay_start:
        return lr
    return lr - (lr - min_lr) * (step - decay_start + 1) / (total - decay_start)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_match_reference(schedule):
    cfg = Config()
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 1e-3, 1e-4, 10
    cfg.optim.schedule, cfg.optim.decay_fraction, cfg.train.max_steps = schedule, 0.25, 100
    got = [lr_at(s, cfg.optim, cfg.train.max_steps) for s in range(100)]
    want = [reference_lr(s, 1e-3, 1e-4, 10, 100, schedule, 0.25) for s in range(100)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[9] == pytest.approx(1e-3)  # warmup reaches the peak
    if schedule != "constant":
        assert got[-1] == pytest.approx(1e-4, rel=0.05)  # ends at min_lr
    if schedule == "wsd":
        assert got[50] == pytest.approx(1e-3)  # stable phase


def test_weight_decay_groups():
    cfg = ModelConfig(
        variant="mac",
        vocab_size=32,
        dim=16,
        depth=1,
        heads=2,
        segment_len=8,
        chunk_size=4,
        num_persistent=2,
        mac_retrieval="memory_tokens",
        num_memory_tokens=2,
    )
    model = TitansLM(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "embed.weight" in decayed
    assert "blocks.0.persistent" in plain and "blocks.0.mem_queries" in plain
    assert "blocks.0.memory.init_weights.0" in plain and "norm.weight" in plain
    assert decayed | plain == set(names.values()) and not decayed & plain


def test_adamw_skips_non_finite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.overflow and torch.equal(p.detach(), torch.ones(3))
    p.grad = torch.ones(3)
    opt.step()
    assert not opt.overflow and (p.detach() < 1).all()


def test_adamw_clips_and_records_the_norm():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = AdamW([p], max_grad_norm=1.0, lr=0.1)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    opt.step()
    assert opt._global_grad_norm == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), rtol=1e-5, atol=1e-6)


def test_deepspeed_config_precision_and_accumulation():

    cfg = Config()
    cfg.train.global_batch, cfg.train.micro_batch = 16, 2
    ds = ds_config(cfg, 2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 16
    assert "bf16" not in ds  # auto: fp32 on CPU (bf16 only where CUDA is available)
    cfg.zero.precision = "bf16"
    assert ds_config(cfg, 2)["bf16"] == {"enabled": True, "check_grad_overflow": True}
    cfg.zero.stage, cfg.zero.offload_optimizer = 3, True
    zero = ds_config(cfg, 2)["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_exactly_one_of_deepspeed_and_the_optimizer_clips(stage):
    """One decision (ZeroConfig.clip_in_optimizer) sets both sides: stage 0 clips in our AdamW,
    which keeps the norm; ZeRO clips over its partitions."""
    cfg = Config()
    cfg.zero.stage, cfg.optim.grad_clip = stage, 0.5
    ours, theirs = clip_split(cfg.zero, 0.5)
    assert theirs == ds_config(cfg, 1)["gradient_clipping"]
    opt = cfg.optim.build(torch.nn.Linear(2, 2), clip=ours)
    if stage == 0:
        assert (ours, theirs, opt.max_grad_norm) == (0.5, 0.0, 0.5)
    else:  # ZeRO wraps it: torch's own AdamW, which DeepSpeed counts as a tested optimizer
        assert (ours, theirs, type(opt)) == (None, 0.5, torch.optim.AdamW)
