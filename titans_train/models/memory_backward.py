"""One chunk of the memory's inner loop, forward and hand-written backward, for the eager path
(issue 14 item 3, issue 16): what ``memory_math.chunk_step`` computes, and its gradient without
an autograd graph. ``memory_group`` runs it over the chunks of a group.

The formulas are those of the Triton backward (``kernels/memory_triton_bwd.py``), second-order
terms included (the inner gradient depends on the weights: LayerNorm's backward is differentiated
again, GELU'' enters through the errors), for any memory depth. With no graph to keep, the ops
can be fused and in place: each state-sized gradient is one scaled copy plus one ``baddbmm``
over the concatenated token factors, instead of a product, a matmul and a sum per term. The
gradients equal autograd through ``scan_chunks`` in fp64 to 1e-10
(tests/test_memory_backward.py).

Shapes: G groups; weights W_l, momentum S_l [G, d_{l-1}, d_l]; per-token tensors [G, n, .];
per-layer read coefficients ``ChunkCoeffs`` (b0, e0, c0 as [G, n, 1], c_theta, e_theta
[G, n, n]); commit coefficients ``ends[l]`` = (b0, c0, e0 [G, 1, 1], last rows of c_theta,
e_theta [G, n, 1]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory_math import LN_EPS, ChunkCoeffs

_LOG_INV_SQRT_2PI = -0.5 * math.log(2.0 * math.pi)
_ln_bwd = torch.ops.aten.native_layer_norm_backward
_gelu_bwd = torch.ops.aten.gelu_backward


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _ln_grad(z: Tensor, mean: Tensor, rstd: Tensor, g: Tensor) -> Tensor:
    """dL/dz given dL/dLN(z) = g, one aten op. Its CPU kernel reads ``mean`` and ``rstd`` as
    contiguous whatever their strides: pass fresh ones."""
    return _ln_bwd(g, z, z.shape[-1:], mean, rstd, None, None, [True, False, False])[0]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """<a_g, b_g> per group, [G] for [G, m, n] (a batched matmul [1, K] x [K, 1] is 10x slower
    on CPU; ``vecdot`` over flattened views dispatched 4 ops, this 2)."""
    return (a * b).sum((-2, -1))


class KeysTape:
    """The memory on a chunk's keys at its start weights, and the inner loss's errors:
    layer inputs a_l (a_0 = k), pre-activations z_l, errors delta_l = dL/dz_l, g_l = the error
    arriving at hidden layer l before GELU', and GELU'(z_l) of the hidden layers: computed once
    (one ``gelu_backward``, erf and exp per element) for its three uses, each then a product."""

    def __init__(self, weights: list[Tensor], k: Tensor, v: Tensor, residual_norm: bool):
        self.weights, self.residual_norm = weights, residual_norm
        acts, pres = [k], []
        for l, w in enumerate(weights):
            pres.append(torch.bmm(acts[-1], w))
            if l < len(weights) - 1:
                acts.append(F.gelu(pres[-1]))
        z = pres[-1]
        if residual_norm:
            xhat, mean, rstd = torch.native_layer_norm(z, z.shape[-1:], None, None, LN_EPS)
            e = k + xhat - v
            delta = _ln_grad(z, mean, rstd, e)
            self.ln = (xhat, mean, rstd, e)
        else:
            delta = z - v
        deltas, gs, gps = [delta], [], []
        for l in range(len(weights) - 1, 0, -1):
            gs.append(torch.bmm(delta, _t(weights[l])))
            # gelu_backward(1, z) * g is gelu_backward(g, z) bit for bit: dy * (cdf + z pdf)
            gps.append(_gelu_bwd(torch.ones_like(gs[-1]), pres[l - 1]))
            delta = gs[-1] * gps[-1]
            deltas.append(delta)
        self.acts, self.pres, self.deltas, self.gs = acts, pres, deltas[::-1], gs[::-1]
        self.gps = gps[::-1]

    def tensors(self) -> list[Tensor]:
        """What ``restore`` needs to rebuild the tape (kept for backward instead of recomputed)."""
        ln = list(self.ln) if self.residual_norm else []
        return [*self.acts[1:], *self.pres, *self.deltas, *self.gs, *self.gps, *ln]

    @staticmethod
    def restore(weights: list[Tensor], k: Tensor, tensors: list[Tensor], residual_norm: bool):
        tape, L = KeysTape.__new__(KeysTape), len(weights)
        tape.weights, tape.residual_norm = weights, residual_norm
        tape.acts = [k, *tensors[: L - 1]]
        tape.pres, tape.deltas = tensors[L - 1 : 2 * L - 1], tensors[2 * L - 1 : 3 * L - 1]
        tape.gs, tape.gps = tensors[3 * L - 1 : 4 * L - 2], tensors[4 * L - 2 : 5 * L - 3]
        if residual_norm:
            tape.ln = tuple(tensors[5 * L - 3 : 5 * L + 1])
        return tape


def commit(
    weights: list[Tensor], momentum: list[Tensor], tape: KeysTape, ends: list[tuple]
) -> tuple[list[Tensor], list[Tensor]]:
    """W' = B W + c S - a^T (C theta)_end delta, S' = E S - a^T (E theta)_end delta per layer."""
    new_w, new_s = [], []
    for w, s, a, d, (b0, c0, e0, ct, et) in zip(weights, momentum, tape.acts, tape.deltas, ends):
        at = _t(a)
        new_w.append((b0 * w).addcmul_(c0, s).baddbmm_(at, ct * d, alpha=-1))
        new_s.append((e0 * s).baddbmm_(at, et * d, alpha=-1))
    return new_w, new_s


def read_forward(
    weights: list[Tensor],
    momentum: list[Tensor],
    tape: KeysTape,
    q: Tensor,
    coeffs: list[ChunkCoeffs],
    residual_norm: bool,
) -> tuple[Tensor, list[tuple]]:
    """The dual-form reads of ``memory_math.chunk_step``:
    z_t = h_t [B_t0 W + c_t S] - sum_{i<=t} C_ti theta_i (h_t . a_i) delta_i, layer by layer.
    Returns (y, per layer (h_in, h W, h S, p = h a^T, (C theta) * p, u))."""
    h, saved = q, []
    for l, (w, s, a, d, co) in enumerate(zip(weights, momentum, tape.acts, tape.deltas, coeffs)):
        hw, hs, p = torch.bmm(h, w), torch.bmm(h, s), torch.bmm(h, _t(a))
        ctp = co.c_theta * p
        u = (co.b0 * hw).addcmul_(co.c0, hs)
        u = u.baddbmm_(ctp, d, alpha=-1)
        saved.append((h, hw, hs, p, ctp, u))
        h = F.gelu(u) if l < len(weights) - 1 else u
    y = q + F.layer_norm(h, h.shape[-1:], eps=LN_EPS) if residual_norm else h
    return y, saved


def _read_backward(weights, momentum, tape: KeysTape, saved, coeffs, dy: Tensor, residual_norm):
    """The reads' gradients: dq; per layer the factor pairs (A, B) with d acts = -A B and
    d deltas = -A B (``chunk_backward`` folds them into the commit's, sign included, in one
    ``baddbmm``); the (left, right) factors of dW (h, B du) and dS (h, c du); the coefficient
    rows (d b0, d c0, -d c_theta)."""
    L = len(weights)
    dact, ddelta, wpair, spair, db0, dc0, dct = ([None] * L for _ in range(7))
    dq, du = None, dy
    if residual_norm:
        u = saved[-1][5]
        _, mean, rstd = torch.native_layer_norm(u, u.shape[-1:], None, None, LN_EPS)
        du, dq = _ln_grad(u, mean, rstd, dy), dy
    for l in range(L - 1, -1, -1):
        h, hw, hs, p, ctp, _ = saved[l]
        co = coeffs[l]
        bg, cg = co.b0 * du, co.c0 * du
        wpair[l], spair[l] = (h, bg), (h, cg)
        db0[l], dc0[l] = (du * hw).sum(-1), (du * hs).sum(-1)
        m = torch.bmm(du, _t(tape.deltas[l]))  # = -dL/d(ctp)
        dct[l] = m * p  # = -dL/d(c_theta)
        mp = m * co.c_theta  # = -dL/dp
        ddelta[l], dact[l] = (_t(ctp), du), (_t(mp), h)
        dh = torch.bmm(bg, _t(weights[l])).baddbmm_(cg, _t(momentum[l]))
        dh = dh.baddbmm_(mp, tape.acts[l], alpha=-1)
        if l:
            du = _gelu_bwd(dh, saved[l - 1][5])
        else:
            dq = _add(dq, dh)
    return dq, dact, ddelta, wpair, spair, (db0, dc0, dct)


def _keys_backward(tape: KeysTape, ddelta: list, dact: list):
    """Back-propagates d deltas and d acts through the errors (second order) and the memory on
    the keys: (dk, dv, per layer the (left, right) factor pairs of dW)."""
    L, w = len(tape.weights), tape.weights
    ddelta, dz, pairs = list(ddelta), [None] * L, [[] for _ in range(L)]
    for l in range(L - 1):  # delta_l = GELU'(z_l) * g_l, g_l = delta_{l+1} W_{l+1}^T
        z = tape.pres[l]
        dg = ddelta[l] * tape.gps[l]
        # GELU''(z) = phi(z) (2 - z^2): dz_l = d delta_l * g_l * GELU''(z_l)
        z2 = z * z
        phi = (z2 * -0.5).add_(_LOG_INV_SQRT_2PI).exp_()
        dz[l] = phi.mul_(2.0 - z2).mul_(tape.gs[l]).mul_(ddelta[l])
        ddelta[l + 1] = torch.baddbmm(ddelta[l + 1], dg, w[l + 1])
        pairs[l + 1].append((dg, tape.deltas[l + 1]))
    g = ddelta[L - 1]
    if tape.residual_norm:  # delta_L = LN'(z)^T e, e = k + LN(z) - v, differentiated again
        xhat, mean, rstd, e = tape.ln
        z, D = tape.pres[-1], xhat.shape[-1]
        de = _ln_grad(z, mean, rstd, g)
        m_dx = (g * xhat).mean(-1, keepdim=True)
        m_ex = (e * xhat).mean(-1, keepdim=True)
        dxhat = de - (g * m_ex + e * m_dx) * rstd
        dr = (g * tape.deltas[-1]).sum(-1, keepdim=True)  # dL/d rstd, times rstd
        dzl = _ln_grad(z, mean, rstd, dxhat).sub_(xhat * (dr * rstd / D))
        dk, dv = de, -de
    else:
        dzl, dk, dv = g, None, -g
    dz[L - 1] = _add(dz[L - 1], dzl)
    for l in range(L - 1, -1, -1):
        pairs[l].append((tape.acts[l], dz[l]))
        da = torch.bmm(dz[l], _t(w[l]))
        if dact[l] is not None:
            da = da.add_(dact[l])
        if l:
            dz[l - 1] = dz[l - 1].add_(da.mul_(tape.gps[l - 1]))
        else:
            dk = _add(dk, da)
    return dk, dv, pairs


def chunk_backward(
    weights: list[Tensor],
    momentum: list[Tensor],
    k: Tensor,
    v: Tensor,
    q: Tensor,
    coeffs: list[ChunkCoeffs],
    ends: list[tuple],
    residual_norm: bool,
    dy: Tensor | None,
    dwn: list[Tensor],
    dsn: list[Tensor],
    tape: KeysTape | None = None,
    saved: list | None = None,
    owned: bool = False,
):
    """Back-propagates one committed chunk from its start state (M, S); its forward intermediates
    (``tape``, the reads' ``saved``) are recomputed unless given.
    Returns (dM, dS at the start, dk, dv, dq or None, read coefficient rows (d b0, d c0,
    -d c_theta per layer) or None, commit coefficient grads per layer (d b0, d c0, d e0 [G];
    d c_theta, d e_theta last rows [G, n]))."""
    tape = tape or KeysTape(weights, k, v, residual_norm)
    L = len(weights)
    ddelta, dact, rows, dq = [None] * L, [None] * L, None, None
    wpairs = spairs = [None] * L
    if dy is not None:
        if saved is None:
            saved = read_forward(weights, momentum, tape, q, coeffs, residual_norm)[1]
        dq, dact, ddelta, wpairs, spairs, rows = _read_backward(
            weights, momentum, tape, saved, coeffs, dy, residual_norm
        )
    dends = []
    for l, (_, _, _, ct, et) in enumerate(ends):  # the commit
        a, d, gw, gs = tape.acts[l], tape.deltas[l], dwn[l], dsn[l]
        pw, ps = torch.bmm(a, gw), torch.bmm(a, gs)
        dd = (ct * pw).addcmul_(et, ps)
        da = torch.bmm(ct * d, _t(gw)).baddbmm_(et * d, _t(gs))
        # d deltas = -(dd + reads' A B), d acts likewise: one baddbmm each, sign included
        r = ddelta[l]
        ddelta[l] = dd.neg_() if r is None else torch.baddbmm(dd, *r, beta=-1, alpha=-1)
        r = dact[l]
        dact[l] = da.neg_() if r is None else torch.baddbmm(da, *r, beta=-1, alpha=-1)
        w, s = weights[l], momentum[l]
        dpw, dps = (d * pw).sum(-1).neg_(), (d * ps).sum(-1).neg_()
        dends.append((_dot(w, gw), _dot(s, gw), _dot(s, gs), dpw, dps))
    dk, dv, kpairs = _keys_backward(tape, ddelta, dact)
    dw, ds = [], []
    for l, (b0, c0, e0, _, _) in enumerate(ends):
        pairs = ([] if wpairs[l] is None else [wpairs[l]]) + kpairs[l]
        left = torch.cat([x for x, _ in pairs], 1) if len(pairs) > 1 else pairs[0][0]
        right = torch.cat([y for _, y in pairs], 1) if len(pairs) > 1 else pairs[0][1]
        # dS first: it reads dM', which dM then overwrites (in place when the caller owns them)
        dsl = (dsn[l].mul_(e0) if owned else e0 * dsn[l]).addcmul_(c0, dwn[l])
        ds.append(dsl if spairs[l] is None else dsl.baddbmm_(_t(spairs[l][0]), spairs[l][1]))
        dw.append((dwn[l].mul_(b0) if owned else b0 * dwn[l]).baddbmm_(_t(left), right))
    return dw, ds, dk, dv, dq, rows, dends
