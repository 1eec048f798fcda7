"""The eager path's hand-written backward (memory_group / memory_backward, issue 14 item 3) equals
autograd through ``memory_math.scan_chunks`` in fp64 to 1e-10, for every input: k, v, q, the
gates through the coefficients, M_0 (document resets) and the group-start M, S."""

from __future__ import annotations

import itertools

import pytest
import torch

from titans_train.models.memory_math import DocFlags, scan_chunks, span_coeffs
from titans_train.models.memory_scan import _HandChunks, flatten_flags, memory_scan

DT = torch.float64


def make_inputs(depth: int, P: int, flags: bool, G=3, C=4, n=4, d=5, h=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = [d] + [h] * (depth - 1) + [d]
    W = [torch.randn(G, a, b, dtype=DT, generator=g) * 0.5 for a, b in zip(dims[:-1], dims[1:])]
    S = [torch.randn(w.shape, dtype=DT, generator=g) * 0.1 for w in W]
    N = C * n
    k, v, q = (torch.randn(G, N, d, dtype=DT, generator=g) for _ in range(3))
    theta = torch.rand(G, N, P, dtype=DT, generator=g) * 0.3
    log_eta = torch.log(torch.rand(G, N, P, dtype=DT, generator=g) * 0.9 + 0.05)
    log_keep = torch.log(1 - torch.rand(G, N, P, dtype=DT, generator=g) * 0.2)
    log_eta[0, 3, 0] = -float("inf")  # eta = 0 and alpha = 1 exactly
    log_keep[1, 5, 0] = -float("inf")
    leaves = [*W, *S, k, v, q, theta, log_eta, log_keep]
    fl = None
    if flags:
        M0 = [torch.randn(w.shape, dtype=DT, generator=g) for w in W]
        reset, commit = torch.rand(G, C, generator=g) < 0.4, torch.rand(G, C, generator=g) < 0.7
        commit[:, -1] = False  # one group's last chunk uncommitted, whatever the draw
        fl = DocFlags(M0, reset, commit)
        leaves += M0
    for t in leaves:
        t.requires_grad_()
    return leaves, fl


def outputs_and_grads(leaves, fl, depth, n, rn, impl, keep=True):
    W, S = leaves[:depth], leaves[depth : 2 * depth]
    k, v, q, theta, log_eta, log_keep = leaves[2 * depth : 2 * depth + 6]
    co = span_coeffs(theta, log_eta, log_keep, n)
    if impl == "autograd":
        y, w, s = scan_chunks(W, S, k, v, q, co, n, rn, False, fl)
    else:
        out = _HandChunks.apply(depth, n, rn, keep, *W, *S, k, v, q, *co, *flatten_flags(fl))
        y, w, s = out[0], out[1 : 1 + depth], out[1 + depth :]
    g = torch.Generator().manual_seed(7)
    outs = [y, *w, *s]
    loss = sum((o * torch.randn(o.shape, dtype=DT, generator=g)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, leaves, allow_unused=True)


CASES = list(itertools.product([1, 2], ["shared", "per_layer"], [True, False], [False, True]))


@pytest.mark.parametrize("depth,gates,rn,flags", CASES)
@pytest.mark.parametrize("keep", [True, False])
def test_hand_backward_equals_autograd(depth, gates, rn, flags, keep):
    P = 1 if gates == "shared" else depth
    leaves, fl = make_inputs(depth, P, flags)
    ref, gref = outputs_and_grads(leaves, fl, depth, 4, rn, "autograd")
    got, ggot = outputs_and_grads(leaves, fl, depth, 4, rn, "hand", keep)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    for i, (a, b) in enumerate(zip(gref, ggot)):
        assert b is not None, f"no gradient for input {i}"
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=f"input {i}")


def test_hand_backward_depth_3():
    leaves, fl = make_inputs(3, 3, True, C=3)
    ref, gref = outputs_and_grads(leaves, fl, 3, 4, True, "autograd")
    got, ggot = outputs_and_grads(leaves, fl, 3, 4, True, "hand")
    for a, b in zip([*ref, *gref], [*got, *ggot]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("group", [0, 2, 3])
def test_memory_scan_grads_equal_autograd_in_fp32_and_fp64(group):
    """memory_scan's eager training path (groups of ``group`` chunks, kept or checkpointed)
    against autograd through scan_chunks over the whole span."""
    for dt, tol in ((DT, 1e-10), (torch.float32, 1e-4)):  # fp32: relative to the largest entry
        leaves, _ = make_inputs(2, 1, False, C=5)
        leaves = [t.detach().to(dt).requires_grad_() for t in leaves]
        W, S, (k, v, q, theta, log_eta, log_keep) = leaves[:2], leaves[2:4], leaves[4:]
        y, w, s = memory_scan(W, S, k, v, q, theta, log_eta, log_keep, 4, True, group)
        ref = scan_chunks(W, S, k, v, q, span_coeffs(theta, log_eta, log_keep, 4), 4, True)
        g = torch.Generator().manual_seed(3)
        rs = [torch.randn(o.shape, generator=g).to(dt) for o in (y, *w, *s)]
        a = torch.autograd.grad(sum((o * r).sum() for o, r in zip((y, *w, *s), rs)), leaves)
        b = torch.autograd.grad(sum((o * r).sum() for o, r in zip((ref[0], *ref[1], *ref[2]), rs)),
                                leaves)  # fmt: skip
        for x, z in zip(a, b):
            scale = 1.0 if dt == DT else z.abs().max().item()
            torch.testing.assert_close(x, z, rtol=tol, atol=tol * scale)
