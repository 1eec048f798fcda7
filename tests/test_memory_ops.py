"""ATen ops per token per layer of the eager memory path (issue 14 item 4, issue 16).

On CPU at small widths, and on GPUs as kernel launches, the memory's cost is its op count, so a
change that silently adds ops per chunk is a slowdown. The count is exact and machine-independent:
a TorchDispatchMode counts every op of a tiny NeuralMemory forward + backward. The ceilings sit
just above today's counts; lower them when the count falls.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titans_train.models import NeuralMemory


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_fwd_bwd(T: int, checkpoint_group: int) -> int:
    torch.manual_seed(0)
    mem = NeuralMemory(32, 2, chunk_size=8, depth=2, checkpoint_group=checkpoint_group)
    x = torch.randn(2, T, 32, requires_grad=True)
    mem(x)[0].sum().backward()  # warm-up: first calls may build cached masks
    with OpCounter() as counter:
        mem(x)[0].sum().backward()
    return counter.n


# (checkpoint_group, ceiling on ops per token per layer, ceiling on ops of a 64-token call)
# Counts at commit time, ops per token per layer / ops of a 64-token call, with the hand-written
# backward (memory_backward.py; issue 14 item 3): checkpoint groups of 16 36.4 / 2,872 (before it
# 53.5 / 3,896; before issue 16: 86.1 / 6,023); no checkpointing (the chunks' intermediates kept)
# 29.0 / 2,368 (before: 42.8 / 3,053; 62.1 / 4,277). With the conv as one autograd node, q/k/v
# to heads in one copy and the coefficient gradients stacked once (issue 16, 2026-12-01):
# 34.4 / 2,699 and 27.0 / 2,195; with the reads' gradients folded into the commit's (one
# baddbmm, sign included) and the read coefficients unsqueezed once per group: 31.6 / 2,532 and
# 24.8 / 2,057; with GELU'(z) computed once per chunk, dM and dS updated in place, one-op dots
# and the checkpointed backward rebuilding each group with its intermediates (issue 16,
# 2026-12-01 06:30): 29.4 / 2,391 and 23.5 / 1,977. A variant batching the reads of all chunks
# had fewer ops (11.8 per token) but was slower on CPU: its [G x chunks]-row tensors fall out of
# cache.
CEILINGS = [(16, 30.0, 2450), (0, 24.0, 2030)]


@pytest.mark.parametrize("group,per_token_max,per_call_max", CEILINGS)
def test_eager_memory_op_count_ceiling(group, per_token_max, per_call_max):
    short, long = ops_fwd_bwd(32, group), ops_fwd_bwd(64, group)
    per_token = (long - short) / 32  # the marginal cost: 4 more chunks, no per-call overhead
    assert per_token <= per_token_max, f"{per_token:.1f} ops per token per layer"
    assert long <= per_call_max, f"{long} ops for a 64-token call"
