"""The memory's chunk loop with a hand-written backward, for the eager path (issue 14 item 3,
issue 16): what ``memory_math.scan_chunks`` computes, and its gradient without an autograd graph.

Only the recurrence across chunks is sequential. The forward walks the chunks in order doing the
memory on the keys, the errors and the commit (~32 ops per chunk at depth 2), keeps every chunk's
start state, and then reads all queries of the group in one batch (the dual form needs only the
chunk-start state). The backward first recomputes every chunk's intermediates in one batch from
those start states, back-propagates the reads in one batch, then walks the chunks in reverse
carrying dM, dS through the commits (the only sequential part), and finishes the commit's
gradients to k, v and the coefficients in one batch again. The formulas are those of the Triton
backward (``kernels/memory_triton_bwd.py``), second-order terms included, for any memory depth;
tests/test_memory_backward.py checks them against autograd through ``scan_chunks`` in fp64.

Shapes: B = batch of (group x chunk) rows; weights W_l, momentum S_l [B, d_{l-1}, d_l]; per-token
tensors [B, n, .]; per-layer coefficients ``ChunkCoeffs`` with fields [B, n(, n)].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory_math import LN_EPS, ChunkCoeffs

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_ln_bwd = torch.ops.aten.native_layer_norm_backward
_gelu_bwd = torch.ops.aten.gelu_backward


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


class KeysTape:
    """The memory on a chunk's keys at its start weights, and the inner loss's errors:
    layer inputs a_l (a_0 = k), pre-activations z_l, errors delta_l = dL/dz_l, g_l = the error
    arriving at hidden layer l before GELU'. ``second_order()`` adds what the backward reuses."""

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
            delta = self._ln_grad(z, mean, rstd, e)
            self.ln = (xhat, mean, rstd, e)
        else:
            delta = z - v
        deltas, gs = [delta], []
        for l in range(len(weights) - 1, 0, -1):
            gs.append(torch.bmm(delta, _t(weights[l])))
            delta = _gelu_bwd(gs[-1], pres[l - 1])
            deltas.append(delta)
        self.acts, self.pres, self.deltas, self.gs = acts, pres, deltas[::-1], gs[::-1]

    @staticmethod
    def _ln_grad(z: Tensor, mean: Tensor, rstd: Tensor, g: Tensor) -> Tensor:
        return _ln_bwd(g, z, z.shape[-1:], mean, rstd, None, None, [True, False, False])[0]

    def ln_grad(self, g: Tensor) -> Tensor:
        """dL/dz_L given dL/dLN(z_L) = g (one aten op)."""
        return self._ln_grad(self.pres[-1], self.ln[1], self.ln[2], g)

    def second_order(self) -> KeysTape:
        """kappa_l = g_l GELU''(z_l) per hidden layer, and LayerNorm's double-backward factors."""
        self.kappa = []
        for g, z in zip(self.gs, self.pres):
            z2 = z * z
            self.kappa.append(g * torch.exp(z2 * -0.5) * (2.0 - z2) * _INV_SQRT_2PI)
        if self.residual_norm:
            xhat, _, rstd, e = self.ln
            d = xhat.shape[-1]
            self.r_mex = rstd * (e * xhat).mean(-1, keepdim=True)
            self.r_e = rstd * e
            self.delta_r = self.deltas[-1] / rstd
            self.r2x = (rstd * rstd / d) * xhat
        return self

    def chunks(self, G: int, C: int) -> list[KeysTape]:
        """The tape of a [G * C]-row batch as C tapes of G rows (chunk c = rows g * C + c)."""
        names = ["weights", "acts", "pres", "deltas", "gs", "kappa"]
        split = {n: [t.view(G, C, *t.shape[1:]).unbind(1) for t in getattr(self, n)] for n in names}
        ln = ["r_mex", "r_e", "delta_r", "r2x"] if self.residual_norm else []
        lnx = {n: getattr(self, n).view(G, C, *getattr(self, n).shape[1:]).unbind(1) for n in ln}
        if self.residual_norm:  # xhat, mean, rstd for the one-op LayerNorm backward; aten's CPU
            # kernel reads mean and rstd as contiguous whatever their strides, so they are copied
            xhat, mean, rstd = (t.view(G, C, *t.shape[1:]) for t in self.ln[:3])
            stats = [t.transpose(0, 1).contiguous().unbind(0) for t in (mean, rstd)]
            lnx["ln"] = [xhat.unbind(1), *stats]
        out = []
        for c in range(C):
            tape = KeysTape.__new__(KeysTape)
            tape.residual_norm = self.residual_norm
            for n in names:
                setattr(tape, n, [ts[c] for ts in split[n]])
            for n in ln:
                setattr(tape, n, lnx[n][c])
            if self.residual_norm:
                tape.ln = (*(ts[c] for ts in lnx["ln"]), None)
            out.append(tape)
        return out


def commit(
    weights: list[Tensor], momentum: list[Tensor], tape: KeysTape, ends: list[tuple]
) -> tuple[list[Tensor], list[Tensor]]:
    """W' = B W + c S - a^T (C theta)_end delta, S' = E S - a^T (E theta)_end delta per layer;
    ``ends[l]`` = (b0, c0, e0 [B, 1, 1], c_theta, e_theta last rows [B, n, 1])."""
    new_w, new_s = [], []
    for w, s, a, d, (b0, c0, e0, ct, et) in zip(weights, momentum, tape.acts, tape.deltas, ends):
        at = _t(a)
        new_w.append(b0 * w + c0 * s - torch.bmm(at, ct * d))
        new_s.append(e0 * s - torch.bmm(at, et * d))
    return new_w, new_s


def read_forward(
    weights: list[Tensor],
    momentum: list[Tensor],
    tape: KeysTape,
    q: Tensor,
    coeffs: list[ChunkCoeffs],
    residual_norm: bool,
) -> tuple[Tensor, list[tuple]]:
    """The dual-form reads of ``memory_math.chunk_step`` (same ops, batched over chunks too):
    (y, per layer (h_in, h W, h S, p = h a^T, (C theta) * p, u))."""
    h, saved = q, []
    for l, (w, s, a, d, co) in enumerate(zip(weights, momentum, tape.acts, tape.deltas, coeffs)):
        hw, hs, p = torch.bmm(h, w), torch.bmm(h, s), torch.bmm(h, _t(a))
        ctp = co.c_theta * p
        u = co.b0.unsqueeze(-1) * hw + co.c0.unsqueeze(-1) * hs
        u = u - torch.bmm(ctp, d)
        saved.append((h, hw, hs, p, ctp, u))
        h = F.gelu(u) if l < len(weights) - 1 else u
    y = q + F.layer_norm(h, h.shape[-1:], eps=LN_EPS) if residual_norm else h
    return y, saved


def read_backward(weights, momentum, tape: KeysTape, saved, coeffs, dy: Tensor, residual_norm):
    """Gradients of the reads: (dW, dS, dq, d acts, d deltas, d b0, d c0, d c_theta) per layer."""
    L = len(weights)
    dw, ds, dact, ddelta, db0, dc0, dct = ([None] * L for _ in range(7))
    dq = None
    du = dy
    if residual_norm:
        u = saved[-1][5]
        _, mean, rstd = torch.native_layer_norm(u, u.shape[-1:], None, None, LN_EPS)
        du, dq = KeysTape._ln_grad(u, mean, rstd, dy), dy
    for l in range(L - 1, -1, -1):
        h, hw, hs, p, ctp, _ = saved[l]
        co = coeffs[l]
        bg, cg = co.b0.unsqueeze(-1) * du, co.c0.unsqueeze(-1) * du
        ht = _t(h)
        dw[l], ds[l] = torch.bmm(ht, bg), torch.bmm(ht, cg)
        db0[l], dc0[l] = (du * hw).sum(-1), (du * hs).sum(-1)
        m = torch.bmm(du, _t(tape.deltas[l]))  # = -dL/d(ctp)
        dct[l] = -(m * p)
        mp = m * co.c_theta  # = -dL/dp
        ddelta[l] = -torch.bmm(_t(ctp), du)
        dact[l] = -torch.bmm(_t(mp), h)
        dh = torch.bmm(bg, _t(weights[l])) + torch.bmm(cg, _t(momentum[l]))
        dh = dh - torch.bmm(mp, tape.acts[l])
        if l:
            du = _gelu_bwd(dh, saved[l - 1][5])
        else:
            dq = _add(dq, dh)
    return dw, ds, dq, dact, ddelta, db0, dc0, dct


def commit_backward(weights, momentum, tape: KeysTape, ends, dwn, dsn, coeff_grads: bool):
    """Gradients of ``commit`` given dW', dS': (dW, dS, d acts, d deltas, coefficient grads per
    layer (d b0, d c0, d e0 [B]; d c_theta, d e_theta last rows [B, n]) or None). The key
    gradient (d acts[0]) only with ``coeff_grads`` (the batched pass, not the sequential one)."""
    L = len(weights)
    dw, ds, dact, ddelta, dco = ([None] * L for _ in range(5))
    for l, (b0, c0, e0, ct, et) in enumerate(ends):
        a, d, gw, gs = tape.acts[l], tape.deltas[l], dwn[l], dsn[l]
        dw[l], ds[l] = b0 * gw, c0 * gw + e0 * gs
        pw, ps = torch.bmm(a, gw), torch.bmm(a, gs)
        ddelta[l] = -(ct * pw + et * ps)
        if l or coeff_grads:
            dact[l] = -(torch.bmm(ct * d, _t(gw)) + torch.bmm(et * d, _t(gs)))
        if coeff_grads:
            w, s = weights[l], momentum[l]
            dco[l] = (
                (w * gw).sum((-2, -1)),
                (s * gw).sum((-2, -1)),
                (s * gs).sum((-2, -1)),
                -(d * pw).sum(-1),
                -(d * ps).sum(-1),
            )
    return dw, ds, dact, ddelta, dco


def keys_backward(tape: KeysTape, ddelta: list, dact: list, inputs: bool, weights: bool = True):
    """Back-propagates d deltas and d acts through the errors (second order) and the memory on
    the keys: (dW per layer or None, dk, dv); dW only with ``weights``, dk and dv only with
    ``inputs``. Needs ``second_order()``."""
    L, w = len(tape.weights), tape.weights
    ddelta, dz, dw = list(ddelta), [None] * L, [None] * L
    for l in range(L - 1):  # delta_l = GELU'(z_l) * (delta_{l+1} W_{l+1}^T)
        if ddelta[l] is None:
            continue
        dg = _gelu_bwd(ddelta[l], tape.pres[l])
        dz[l] = ddelta[l] * tape.kappa[l]
        ddelta[l + 1] = _add(ddelta[l + 1], torch.bmm(dg, w[l + 1]))
        if weights:
            dw[l + 1] = torch.bmm(_t(dg), tape.deltas[l + 1])
    g = ddelta[L - 1]
    dk = dv = None
    if tape.residual_norm:  # delta_L = LN'(z)^T e, e = k + LN(z) - v, differentiated again
        xhat = tape.ln[0]
        de = tape.ln_grad(g)
        m_dx = (g * xhat).mean(-1, keepdim=True)
        dxhat = de - g * tape.r_mex - tape.r_e * m_dx
        dr = (g * tape.delta_r).sum(-1, keepdim=True)
        dz[L - 1] = _add(dz[L - 1], tape.ln_grad(dxhat) - dr * tape.r2x)
        if inputs:
            dk, dv = de, -de
    else:
        dz[L - 1] = _add(dz[L - 1], g)
        if inputs:
            dv = -g
    for l in range(L - 1, -1, -1):
        if dz[l] is not None and weights:
            dw[l] = _add(dw[l], torch.bmm(_t(tape.acts[l]), dz[l]))
        if l == 0 and not inputs:
            break
        da = dact[l]
        if dz[l] is not None:
            da = _add(da, torch.bmm(dz[l], _t(w[l])))
        if l == 0:
            dk = _add(dk, da)
        elif da is not None:
            dz[l - 1] = _add(dz[l - 1], _gelu_bwd(da, tape.pres[l - 1]))
    return dw, dk, dv
