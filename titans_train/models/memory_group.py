"""A group of whole chunks on the eager path with the hand-written backward (``memory_backward``):
``scan_group`` (the forward: sequential commits, reads batched over the group's chunks) and
``group_backward`` (batched recompute and reads, then the chunks in reverse).

Inputs as ``memory_math.scan_chunks``: weights and momentum per layer [G, d_{l-1}, d_l], k/v/q
[G, N, d] with N a multiple of ``chunk``, the five coefficient fields [P, G, C, n(, n)] of
``span_coeffs`` and optionally ``DocFlags``. Chunk-start states are stacked [G, C, ...].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory_backward import (
    KeysTape,
    _add,
    commit,
    commit_backward,
    keys_backward,
    read_backward,
    read_forward,
)
from .memory_math import ChunkCoeffs, DocFlags, apply_reset


def _chunk_ends(coeffs: list[Tensor], p: int) -> list[tuple]:
    """Per chunk, gate set p's commit coefficients: (b0, c0, e0) [G, 1, 1], last rows of
    c_theta and e_theta [G, n, 1]."""
    b0, e0, c0, ct, et = (f[p] for f in coeffs)
    scalars = [x[..., -1, None, None].unbind(1) for x in (b0, c0, e0)]
    rows = [x[..., -1, :, None].unbind(1) for x in (ct, et)]
    return list(zip(*scalars, *rows))


def _flat_coeffs(coeffs: list[Tensor], n_layers: int) -> list[ChunkCoeffs]:
    """Each layer's coefficients with group and chunk merged: fields [G * C, n(, n)]."""
    P = coeffs[0].shape[0]
    sets = [ChunkCoeffs(*(f[p].flatten(0, 1) for f in coeffs)) for p in range(P)]
    return [sets[min(l, P - 1)] for l in range(n_layers)]


def _flags_lists(flags: DocFlags | None, C: int) -> tuple[list[bool], list[bool]]:
    """(a reset before chunk c in some group, chunk c uncommitted in some group), read once."""
    if flags is None:
        return [False] * C, [False] * C
    return flags.reset.any(0).tolist(), (~flags.commit).any(0).tolist()


def scan_group(
    weights: list[Tensor],
    momentum: list[Tensor],
    k: Tensor,
    v: Tensor,
    q: Tensor | None,
    coeffs: list[Tensor],
    chunk: int,
    residual_norm: bool,
    flags: DocFlags | None = None,
) -> tuple[Tensor | None, list[Tensor], list[Tensor], list[Tensor]]:
    """``scan_chunks``'s (reads, final M, final S), and every chunk's start state (after a
    reset): W per layer then S per layer, [G, C, ...]. The reads run after the loop, all chunks
    in one batch."""
    G, N, _ = k.shape
    C, L, P = N // chunk, len(weights), coeffs[0].shape[0]
    ends = [_chunk_ends(coeffs, p) for p in range(P)]
    ks, vs = (t.view(G, C, chunk, -1).unbind(1) for t in (k, v))
    resets, holds = _flags_lists(flags, C)
    starts, tapes = [], []
    for c in range(C):
        if resets[c]:
            weights, momentum = apply_reset(weights, momentum, flags, c)
        starts.append((weights, momentum))
        tape = KeysTape(weights, ks[c], vs[c], residual_norm)
        new_w, new_s = commit(weights, momentum, tape, [ends[min(l, P - 1)][c] for l in range(L)])
        if holds[c]:
            keep = flags.commit[:, c, None, None]
            new_w = [torch.where(keep, a, b) for a, b in zip(new_w, weights)]
            new_s = [torch.where(keep, a, b) for a, b in zip(new_s, momentum)]
        if q is not None:
            tapes.append(tape)
        weights, momentum = new_w, new_s
    states = [torch.stack([st[i][l] for st in starts], 1) for i in (0, 1) for l in range(L)]
    y = None
    if q is not None:
        flat = [s.flatten(0, 1) for s in states]
        tape = KeysTape.__new__(KeysTape)
        tape.acts = [k.reshape(G * C, chunk, -1)]
        tape.acts += [torch.stack([t.acts[l] for t in tapes], 1).flatten(0, 1) for l in range(1, L)]
        tape.deltas = [torch.stack([t.deltas[l] for t in tapes], 1).flatten(0, 1) for l in range(L)]
        y, _ = read_forward(
            flat[:L], flat[L:], tape, q.reshape(G * C, chunk, -1), _flat_coeffs(coeffs, L),
            residual_norm,
        )  # fmt: skip
        y = y.view(G, N, -1)
    return y, weights, momentum, states


def _per_chunk(x: Tensor | None, G: int, C: int) -> list:
    """[G * C, ...] -> C tensors [G, ...] (chunk c = rows g * C + c)."""
    return [None] * C if x is None else list(x.view(G, C, *x.shape[1:]).unbind(1))


def group_backward(
    states: list[Tensor],
    k: Tensor,
    v: Tensor,
    q: Tensor,
    coeffs: list[Tensor],
    chunk: int,
    residual_norm: bool,
    flags: DocFlags | None,
    dy: Tensor | None,
    dwn: list[Tensor],
    dsn: list[Tensor],
) -> list[Tensor | None]:
    """Gradients of (M, S at the group start, k, v, q, the five coefficient fields[, M_0])
    from those of (reads, final M, final S); ``states`` from ``scan_group``."""
    G, N, d = k.shape
    C, L, B = N // chunk, len(states) // 2, G * (N // chunk)
    W, S = [s.flatten(0, 1) for s in states[:L]], [s.flatten(0, 1) for s in states[L:]]
    co = _flat_coeffs(coeffs, L)
    ends = [
        (c.b0[:, -1, None, None], c.c0[:, -1, None, None], c.e0[:, -1, None, None],
         c.c_theta[:, -1, :, None], c.e_theta[:, -1, :, None])
        for c in co
    ]  # fmt: skip
    tape = KeysTape(W, k.reshape(B, chunk, d), v.reshape(B, chunk, d), residual_norm)
    tape.second_order()

    # The reads, all chunks at once (they do not depend on later chunks).
    rw = rs = [None] * L
    dq = dk = dv = None
    rows = None
    if dy is not None:
        _, saved = read_forward(W, S, tape, q.reshape(B, chunk, d), co, residual_norm)
        rw, rs, dq, ract, rdelta, *rows = read_backward(
            W, S, tape, saved, co, dy.reshape(B, chunk, d), residual_norm
        )
        kw, dk, dv = keys_backward(tape, rdelta, ract, inputs=True)
        rw = [_add(a, b) for a, b in zip(rw, kw)]

    # The commits in reverse: dM, dS flow from each chunk's end to its start.
    per, ends_c = tape.chunks(G, C), [list(zip(*(_per_chunk(x, G, C) for x in e))) for e in ends]
    rw_c, rs_c = [_per_chunk(x, G, C) for x in rw], [_per_chunk(x, G, C) for x in rs]
    resets, holds = _flags_lists(flags, C)
    gw = [torch.zeros_like(s[:, 0]) if g is None else g for g, s in zip(dwn, states[:L])]
    gs = [torch.zeros_like(s[:, 0]) if g is None else g for g, s in zip(dsn, states[L:])]
    dm0 = [None] * L
    kept = [None] * C
    for c in range(C - 1, -1, -1):
        t, pw, ps = per[c], None, None
        if holds[c]:  # an uncommitted chunk hands dM', dS' to its start state untouched
            keep = flags.commit[:, c, None, None]
            pw, ps = ([torch.where(keep, 0.0, x) for x in g] for g in (gw, gs))
            gw, gs = ([torch.where(keep, x, 0.0) for x in g] for g in (gw, gs))
        kept[c] = (gw, gs)
        cw, cs, cact, cdelta, _ = commit_backward(
            t.weights, None, t, [e[c] for e in ends_c], gw, gs, False
        )
        kw, _, _ = keys_backward(t, cdelta, cact, inputs=False)
        gw = [_add(_add(_add(a, b), r[c]), p) for a, b, r, p in zip(cw, kw, rw_c, pw or [None] * L)]
        gs = [_add(_add(a, r[c]), p) for a, r, p in zip(cs, rs_c, ps or [None] * L)]
        if resets[c]:  # M restarted at M_0 here: its gradient goes to M_0, none further back
            r = flags.reset[:, c, None, None]
            dm0 = [_add(m, torch.where(r, x, 0.0)) for m, x in zip(dm0, gw)]
            gw, gs = [torch.where(r, 0.0, x) for x in gw], [torch.where(r, 0.0, x) for x in gs]

    # The commits' gradients to k, v and the coefficients, all chunks at once.
    kw_all = [torch.stack([kept[c][0][l] for c in range(C)], 1).flatten(0, 1) for l in range(L)]
    ks_all = [torch.stack([kept[c][1][l] for c in range(C)], 1).flatten(0, 1) for l in range(L)]
    _, _, cact, cdelta, cco = commit_backward(W, S, tape, ends, kw_all, ks_all, True)
    _, dk_c, dv_c = keys_backward(tape, cdelta, cact, inputs=True, weights=False)
    dk, dv = _add(dk, dk_c), _add(dv, dv_c)
    dco = _coeff_grads(coeffs, rows, cco, G, C)
    grads = [*gw, *gs, dk.view(G, N, d), dv.view(G, N, d)]
    grads += [None if dq is None else dq.view(G, N, d), *dco]
    if flags is not None:
        grads += [m if m is not None else torch.zeros_like(w) for m, w in zip(dm0, flags.init)]
    return grads


def _coeff_grads(coeffs: list[Tensor], rows, ends: list[tuple], G: int, C: int) -> list[Tensor]:
    """The five coefficient fields' gradients [P, G, C, n(, n)]: the reads' rows (d b0, d c0,
    d c_theta; None without reads) plus the commits' last entries and rows, summed over the layers
    that share a gate set."""
    P, n, L = coeffs[0].shape[0], coeffs[0].shape[-1], len(ends)
    out = [[] for _ in range(5)]
    for p in range(P):
        layers = [l for l in range(L) if min(l, P - 1) == p]
        e = [sum(ends[l][i] for l in layers) for i in range(5)]  # b0, c0, e0, c_theta, e_theta
        r = [None] * 3 if rows is None else [sum(rows[i][l] for l in layers) for i in range(3)]
        last = F.pad(e[0][:, None], (n - 1, 0))
        out[0].append(_add(r[0], last))  # b0
        out[1].append(F.pad(e[2][:, None], (n - 1, 0)))  # e0
        out[2].append(_add(r[1], F.pad(e[1][:, None], (n - 1, 0))))  # c0
        out[3].append(_add(r[2], F.pad(e[3][:, None, :], (0, 0, n - 1, 0))))  # c_theta
        out[4].append(F.pad(e[4][:, None, :], (0, 0, n - 1, 0)))  # e_theta
    return [torch.stack(f, 0).view(P, G, C, *f[0].shape[1:]) for f in out]
