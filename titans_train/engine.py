"""DeepSpeed engine built from our config: ZeRO stage, precision, optimizer groups, LR schedule."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from titans_train.distributed import accelerator, device_type
from titans_train.models.policy import takes_weight_decay

if TYPE_CHECKING:  # the config sections build through this module (config.py imports it)
    from titans_train.config import OptimConfig, TrainConfig, ZeroConfig


def lr_at(step: int, o: OptimConfig, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``: linear warmup, then cosine
    or warmup-stable-decay (WSD: constant, then a linear decay over the last decay_fraction)."""
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "cosine":
        span = max(1, total - o.warmup_steps)
        frac = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * frac))
    decay_steps = round(o.decay_fraction * total)
    start = total - decay_steps
    if step < start or decay_steps == 0:
        return o.lr
    frac = min(1.0, (step - start + 1) / decay_steps)
    return o.lr + (o.min_lr - o.lr) * frac


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices; none on norms, biases, and the learned states their modules mark
    (persistent tokens, memory queries, M_0: ``models.policy``). In named_parameters order."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue  # a tied weight is listed once, under its first module
            seen.add(id(p))
            (decay if takes_weight_decay(module, name, p) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class AdamW(torch.optim.AdamW):
    """torch AdamW for ZeRO stage 0: clips, records the gradient norm, skips non-finite steps.

    DeepSpeed's ZeRO optimizers do all three themselves. Its stage-0 path calls the client
    optimizer directly, then reads ``overflow`` (to count the skip and hold the schedule) and
    ``_global_grad_norm``; its own stage-0 clipping discards the norm, so it is turned off and
    done here (``max_grad_norm``). Gradients are already all-reduced when ``step`` runs.
    """

    overflow = False
    _global_grad_norm = None

    def __init__(self, params, max_grad_norm: float = 0.0, **kw):
        super().__init__(params, **kw)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return super().step(closure)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self._global_grad_norm = norm.item()
        self.overflow = not torch.isfinite(norm).item()
        if self.overflow:
            return None
        if self.max_grad_norm > 0 and self._global_grad_norm > self.max_grad_norm:
            torch._foreach_mul_(grads, self.max_grad_norm / (self._global_grad_norm + 1e-6))
        return super().step(closure)


def clip_split(z: ZeroConfig, grad_clip: float) -> tuple[float | None, float]:
    """(our optimizer's clip, DeepSpeed's clip): exactly one side clips. None: the optimizer is
    wrapped by ZeRO, which clips, counts and skips itself (build_optimizer)."""
    return (grad_clip, 0.0) if z.clip_in_optimizer else (None, grad_clip)


def use_bf16(z: ZeroConfig) -> bool:
    """``auto``: bf16 on an accelerator that supports it (DeepSpeed's view), fp32 on CPU."""
    if z.precision == "auto":
        return device_type() != "cpu" and accelerator().is_bf16_supported()
    return z.precision == "bf16"


def deepspeed_config(
    z: ZeroConfig, t: TrainConfig, grad_clip: float, world_size: int, load_universal: bool = False
) -> dict:
    zero: dict = {"stage": z.stage}
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type() == "cuda"}
    if z.stage == 3 and z.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = z.param_persistence_threshold
    ds = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.global_batch // (world_size * t.micro_batch),
        "gradient_clipping": clip_split(z, grad_clip)[1],
        "zero_optimization": zero,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if load_universal:  # resuming on another world size (train_state.py)
        ds["checkpoint"] = {"load_universal": True}
    if use_bf16(z):
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
        ds.update(reduce_dtypes(z))
    return ds


def reduce_dtypes(z: ZeroConfig) -> dict:
    """bf16 runs: gradients accumulated and reduced in fp32 by default (``zero.grad_accum_dtype``,
    ``zero.communication_dtype``); DeepSpeed's own default is the model dtype, bf16.

    DeepSpeed 0.19.8 honours ``communication_data_type`` at every stage (stage 0 in its
    all-reduce fallback, 1-2 in stage_1_and_2, 3 in stage3). ``data_types.grad_accum_dtype``
    fp32 is honoured at stage 1 (its BF16_Optimizer), 2 and 3; at stage 0 a bf16 model with fp32
    accumulation raises "unsupported mix of model_dtype and grad_accum_dtype", so stage 0 keeps
    its gradients in bf16 (its FP16_Optimizer still steps fp32 master weights).
    """
    out: dict = {"communication_data_type": z.communication_dtype}
    if z.stage > 0:
        out["data_types"] = {"grad_accum_dtype": z.grad_accum_dtype}
    return out


def build_optimizer(
    o: OptimConfig, model: nn.Module, clip: float | None = None, offload: bool = False
) -> torch.optim.Optimizer:
    """``clip=None``: plain torch AdamW, for ZeRO stages 1-3, which do the clipping, the norm and
    the skip themselves and take torch's AdamW as a tested optimizer (any subclass draws
    DeepSpeed's "untested optimizer" warning). A float: our stage-0 AdamW, clipping at it."""
    groups = param_groups(model, o.weight_decay)
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    kw["fused"] = device_type() == "cuda"
    if clip is None:
        return torch.optim.AdamW(groups, **kw)
    return AdamW(groups, max_grad_norm=clip, **kw)


def build_engine(
    z: ZeroConfig,
    model: nn.Module,
    optim: OptimConfig,
    train: TrainConfig,
    world_size: int,
    load_universal: bool = False,
):
    """deepspeed.initialize with our optimizer and a LambdaLR schedule (saved in checkpoints).
    Called as ``cfg.zero.build_engine(model, cfg.optim, cfg.train, world_size)``."""
    import deepspeed

    clip = clip_split(z, optim.grad_clip)[0]
    optimizer = optim.build(model, clip=clip, offload=z.offload_optimizer)
    lr = optim.lr_schedule(train.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr(step) / optim.lr)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(z, train, optim.grad_clip, world_size, load_universal),
    )
    return engine, optimizer, scheduler
