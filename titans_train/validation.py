"""The model's call on a micro-batch (loss masks, documents, burn-in) and the reductions the
trainer logs: the mean loss of a step and the validation loss.

Both reduce CPU tensors: the process group serves CPU tensors over gloo on a GPU too
(distributed.py), so bookkeeping never moves values to the device and back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from titans_train.data import MicroBatch
from titans_train.distributed import device
from titans_train.models.lm import LMOutput


def all_mean(values: list[torch.Tensor]) -> float:
    """Mean over micro-batches and ranks (equal micro-batch sizes everywhere)."""
    x = torch.stack([v.detach().float().cpu() for v in values]).mean()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x.item()


def loss_tokens(mb: MicroBatch, burn_in: int = 0) -> int:
    """How many of the micro-batch's targets carry loss (all of them without a loss mask); none
    of the first ``burn_in`` (they are inputs of the burn-in, ``forward_rows``)."""
    if mb.loss_mask is None:
        return mb.tokens[:, 1 + burn_in :].numel()
    return int(mb.loss_mask[:, 1 + burn_in :].sum())


def step_loss_weights(counts: list[int]) -> list[float]:
    """A factor per micro-batch, n_i * (micro-batches * ranks) / N with N the step's targets
    that carry loss on all ranks (collective). DeepSpeed averages the micro-batches' mean losses
    over accumulation steps and ranks; scaled by these, the step's gradient is the mean over
    every target that carries loss, however they fall on micro-batches and ranks. With loss
    masks the counts differ (answers per row), and without the factors the weight of an answer
    depended on its micro-batch's count and on the number of processes. Equal counts (no
    masks) give exactly 1.0 each."""
    total = torch.tensor(float(sum(counts)), dtype=torch.float64)
    slots = len(counts)
    if dist.is_initialized():
        dist.all_reduce(total)
        slots *= dist.get_world_size()
    n = total.item()
    return [c * slots / n if n else 0.0 for c in counts]


def document_args(mb: MicroBatch) -> dict:
    """The model's ``doc_starts`` for a micro-batch's inputs, when the loader gives them
    (``data.document_masking``): the marks of tokens[:, :-1], on the compute device."""
    if mb.doc_starts is None:
        return {}
    return {"doc_starts": mb.doc_starts[:, :-1].to(device())}


def loss_targets(mb: MicroBatch, tokens: torch.Tensor) -> torch.Tensor:
    """The targets of ``tokens`` (``mb.tokens`` on the compute device): tokens[:, 1:], with the
    model's ignore index -100 where a token carries no loss (``mb.loss_mask``, from shards with
    a loss mask, e.g. recall data with the loss on the answers only)."""
    targets = tokens[:, 1:]
    if mb.loss_mask is None:
        return targets
    return targets.masked_fill(~mb.loss_mask[:, 1:].to(targets.device), -100)


def forward_rows(model: nn.Module, mb: MicroBatch, burn_in: int = 0) -> LMOutput:
    """The model (engine or module) on a micro-batch: inputs tokens[:, :-1], targets with the
    loss mask's -100, the documents' starts. ``burn_in`` = B > 0 (``train.burn_in``): the first B
    inputs run without gradient and their state, detached, starts the rest, which alone carries
    loss. So training sees a memory that has already absorbed B tokens, at the cost of B tokens
    of forward, and no gradient reaches back into them (truncated BPTT within a row). Streaming
    equals one call, so the loss is the whole row's on targets B.. (tests/test_burn_in.py)."""
    tokens = mb.tokens.to(device())
    targets, docs = loss_targets(mb, tokens), document_args(mb)
    if not burn_in:
        return model(tokens[:, :-1], targets=targets, **docs)
    first = {k: v[:, :burn_in] for k, v in docs.items()}
    rest = {k: v[:, burn_in:] for k, v in docs.items()}
    with torch.no_grad():
        state = model(tokens[:, :burn_in], **first).state.detach()
    return model(tokens[:, burn_in:-1], targets=targets[:, burn_in:], state=state, **rest)


@torch.no_grad()
def validation_loss(
    model: nn.Module, batches: Iterable[list[MicroBatch]], max_batches: int, burn_in: int = 0
) -> dict[str, float]:
    """Loss and perplexity over ``max_batches`` global batches (0 = all), weighted by the
    targets that carry loss and summed over ranks; {} when the split is empty. ``model`` is
    the engine or the bare module; ``burn_in`` as in training (``forward_rows``)."""
    model.eval()
    total, count = torch.zeros(2, dtype=torch.float64), 0
    for micro_batches in batches:
        if max_batches and count >= max_batches:
            break
        for mb in micro_batches:
            n = loss_tokens(mb, burn_in)
            # Every rank runs every forward, even with no target that carries loss: under ZeRO-3
            # a forward gathers parameters with collectives that all ranks must join.
            out = forward_rows(model, mb, burn_in)
            if n:  # a micro-batch with no target that carries loss adds nothing (its loss: NaN)
                total += torch.tensor([out.loss.item() * n, n], dtype=torch.float64)
        count += 1
    model.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    if count == 0 or total[1] == 0:
        return {}
    loss = (total[0] / total[1]).item()
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
