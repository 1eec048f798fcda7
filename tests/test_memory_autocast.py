"""The checkpointed chunk groups recompute in fp32 even when backward runs under autocast."""

import pytest
import torch
import torch.nn.functional as F

from titans_train.models.memory_math import span_coeffs
from titans_train.models.memory_scan import _CheckpointedChunks, autocast_off


def group_grads(autocast_backward: bool) -> list[torch.Tensor]:
    """Gradients through one checkpointed group of chunks (the only node in the graph, so any
    bf16 arithmetic can only come from its recompute)."""
    g = torch.Generator().manual_seed(0)
    G, N, d, P = 2, 8, 8, 1
    W = [torch.randn(G, d, 4 * d, generator=g) / d**0.5, torch.randn(G, 4 * d, d, generator=g) / 8]
    S = [torch.zeros_like(w) for w in W]
    k, q = (F.normalize(torch.randn(G, N, d, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(G, N, d, generator=g)
    gates = [0.5 * torch.rand(G, N, P, generator=g), torch.rand(G, N, P, generator=g).log(),
             (1 - 0.2 * torch.rand(G, N, P, generator=g)).log()]  # fmt: skip
    leaves = [*W, k, v, q]
    for t in leaves:
        t.requires_grad_()
    coeffs = span_coeffs(*gates, 4)  # computed once per call, outside the checkpointed group
    y = _CheckpointedChunks.apply(2, 4, True, False, *W, *S, k, v, q, *coeffs)[0]
    dy = torch.randn(y.shape, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_backward):
        return torch.autograd.grad(y, leaves, dy)


def test_checkpointed_recompute_ignores_autocast():
    plain, under_autocast = group_grads(False), group_grads(True)
    for a, b in zip(plain, under_autocast):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_autocast_off_works_where_autocast_does_not_exist(device):
    with autocast_off(device):
        x = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    assert x.dtype == torch.float32
