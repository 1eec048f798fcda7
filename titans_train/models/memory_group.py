"""A group of whole chunks on the eager path with the hand-written backward (``memory_backward``):
``scan_group`` (the forward, chunk by chunk) and ``group_backward`` (the chunks in reverse, each
recomputed from its start state and back-propagated by hand, without an autograd graph).

Inputs as ``memory_math.scan_chunks``: weights and momentum per layer [G, d_{l-1}, d_l], k/v/q
[G, N, d] with N a multiple of ``chunk``, the five coefficient fields [P, G, C, n(, n)] of
``span_coeffs`` and optionally ``DocFlags``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory_backward import KeysTape, _add, chunk_backward, commit, read_forward
from .memory_math import ChunkCoeffs, DocFlags, apply_reset


def _chunk_coeffs(coeffs: list[Tensor], n_layers: int) -> list[list[tuple]]:
    """Per chunk, per layer: (read coefficients ``ChunkCoeffs``: b0, e0, c0 [G, n, 1], c_theta,
    e_theta [G, n, n]; commit coefficients
    (b0, c0, e0) [G, 1, 1] and the last rows of c_theta, e_theta [G, n, 1])."""
    P = coeffs[0].shape[0]
    sets = []
    for p in range(P):
        b0, e0, c0, ct, et = (f[p] for f in coeffs)
        cols = (b0[..., None], e0[..., None], c0[..., None], ct, et)  # b0, e0, c0 as [G, n, 1]
        reads = [ChunkCoeffs(*fs) for fs in zip(*(f.unbind(1) for f in cols))]
        scalars = [x[..., -1, None, None].unbind(1) for x in (b0, c0, e0)]
        rows = [x[..., -1, :, None].unbind(1) for x in (ct, et)]
        sets.append(list(zip(reads, zip(*scalars, *rows))))
    return [[sets[min(l, P - 1)][c] for l in range(n_layers)] for c in range(b0.shape[1])]


def _flags_lists(flags: DocFlags | None, C: int) -> tuple[list[bool], list[bool]]:
    """(a reset before chunk c in some group, chunk c uncommitted in some group), read once."""
    if flags is None:
        return [False] * C, [False] * C
    return flags.reset.any(0).tolist(), (~flags.commit).any(0).tolist()


def _chunks(t: Tensor | None, C: int) -> list:
    return [None] * C if t is None else list(t.view(t.shape[0], C, -1, t.shape[-1]).unbind(1))


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
    keep: bool = False,
) -> tuple[Tensor | None, list[Tensor], list[Tensor], list[Tensor]]:
    """``scan_chunks``'s (reads, final M, final S), and with ``keep`` every chunk's start state
    (after a reset) as one flat list: chunk 0's W per layer, then its S per layer, then (with
    reads) its forward intermediates for the backward (``KeysTape.tensors``, the reads' saved
    tensors), then chunk 1's..."""
    C, L = k.shape[1] // chunk, len(weights)
    per_chunk = _chunk_coeffs(coeffs, L)
    ks, vs, qs = (_chunks(t, C) for t in (k, v, q))
    resets, holds = _flags_lists(flags, C)
    starts, reads = [], []
    for c in range(C):
        if resets[c]:
            weights, momentum = apply_reset(weights, momentum, flags, c)
        if keep:
            starts += [*weights, *momentum]
        tape = KeysTape(weights, ks[c], vs[c], residual_norm)
        if q is not None:
            co = [x[0] for x in per_chunk[c]]
            y, saved = read_forward(weights, momentum, tape, qs[c], co, residual_norm)
            reads.append(y)
            if keep:
                starts += [*tape.tensors(), *(t for layer in saved for t in layer)]
        new_w, new_s = commit(weights, momentum, tape, [x[1] for x in per_chunk[c]])
        if holds[c]:
            done = flags.commit[:, c, None, None]
            new_w = [torch.where(done, a, b) for a, b in zip(new_w, weights)]
            new_s = [torch.where(done, a, b) for a, b in zip(new_s, momentum)]
        weights, momentum = new_w, new_s
    y = None if q is None else torch.cat(reads, 1)
    return y, weights, momentum, starts


def group_backward(
    starts: list[Tensor],
    k: Tensor,
    v: Tensor,
    q: Tensor,
    coeffs: list[Tensor],
    chunk: int,
    residual_norm: bool,
    flags: DocFlags | None,
    dy: Tensor | None,
    dwn: list[Tensor | None],
    dsn: list[Tensor | None],
) -> list[Tensor | None]:
    """Gradients of (M, S at the group start, k, v, q, the five coefficient fields[, M_0])
    from those of (reads, final M, final S); ``starts`` from ``scan_group``. The chunks run in
    reverse, each recomputed from its start state and back-propagated by hand in one pass."""
    G, N, d = k.shape
    C, L = N // chunk, len(dwn)
    per_chunk = _chunk_coeffs(coeffs, L)
    ks, vs, qs, dys = (_chunks(t, C) for t in (k, v, q, dy))
    resets, holds = _flags_lists(flags, C)
    # the caller's gradients are read only; every later dM, dS is ours to update in place
    owned = all(g is None for g in (*dwn, *dsn))
    gw = [torch.zeros_like(w) if g is None else g for g, w in zip(dwn, starts[:L])]
    gs = [torch.zeros_like(w) if g is None else g for g, w in zip(dsn, starts[L : 2 * L])]
    dm0 = [None] * L
    dk, dv, dq, rows, ends = ([None] * C for _ in range(5))
    per = len(starts) // C  # tensors kept per chunk: the state, and maybe the intermediates
    for c in range(C - 1, -1, -1):
        mine = starts[per * c : per * (c + 1)]
        W, S, rest = mine[:L], mine[L : 2 * L], mine[2 * L :]
        tape = saved = None
        if rest:
            n_tape = len(rest) - 6 * L
            tape = KeysTape.restore(W, ks[c], rest[:n_tape], residual_norm)
            saved = [tuple(rest[n_tape + 6 * l : n_tape + 6 * (l + 1)]) for l in range(L)]
        co, co_end = [x[0] for x in per_chunk[c]], [x[1] for x in per_chunk[c]]
        pw = ps = [None] * L
        if holds[c]:  # an uncommitted chunk hands dM', dS' to its start state untouched
            keep = flags.commit[:, c, None, None]
            pw, ps = ([torch.where(keep, 0.0, x) for x in g] for g in (gw, gs))
            gw, gs = ([torch.where(keep, x, 0.0) for x in g] for g in (gw, gs))
        mine = c < C - 1 or owned  # dM, dS from the previous step are ours to overwrite
        gw, gs, dk[c], dv[c], dq[c], rows[c], ends[c] = chunk_backward(
            W, S, ks[c], vs[c], qs[c], co, co_end, residual_norm, dys[c], gw, gs, tape, saved, mine
        )
        if holds[c]:
            gw, gs = [a + b for a, b in zip(gw, pw)], [a + b for a, b in zip(gs, ps)]
        if resets[c]:  # M restarted at M_0 here: its gradient goes to M_0, none further back
            r = flags.reset[:, c, None, None]
            dm0 = [_add(m, torch.where(r, x, 0.0)) for m, x in zip(dm0, gw)]
            gw, gs = ([torch.where(r, 0.0, x) for x in g] for g in (gw, gs))

    grads = [*gw, *gs, torch.cat(dk, 1), torch.cat(dv, 1)]
    grads += [None if dy is None else torch.cat(dq, 1), *_coeff_grads(coeffs, rows, ends)]
    if flags is not None:
        grads += [m if m is not None else torch.zeros_like(w) for m, w in zip(dm0, flags.init)]
    return grads


def _coeff_grads(coeffs: list[Tensor], rows: list, ends: list) -> list[Tensor]:
    """The five coefficient fields' gradients [P, G, C, n(, n)] from per chunk: the reads' rows
    (d b0, d c0, -d c_theta per layer; None without reads) and the commits' last entries and rows
    (per layer: d b0, d c0, d e0 [G]; d c_theta, d e_theta [G, n]), summed over the layers that
    share a gate set."""
    P, n, L = coeffs[0].shape[0], coeffs[0].shape[-1], len(ends[0])
    out = [[] for _ in range(5)]

    def stacked(per_chunk: list, layers: list[int]) -> Tensor:
        """[G, C(, n)]: per chunk, the sum over ``layers``; one stack and one sum, not an add
        per chunk and layer."""
        t = torch.stack([x for ch in per_chunk for x in (ch[l] for l in layers)], 1)
        return t if len(layers) == 1 else t.unflatten(1, (-1, len(layers))).sum(2)

    for p in range(P):
        layers = [l for l in range(L) if min(l, P - 1) == p]
        # [G, C(, n)] per field: the commit's ends, then the reads' rows
        e = [stacked([[x[i] for x in ch] for ch in ends], layers) for i in range(5)]
        r = [None] * 3
        if rows[0] is not None:
            r = [stacked([ch[i] for ch in rows], layers) for i in range(3)]
        out[0].append(_add(r[0], F.pad(e[0][..., None], (n - 1, 0))))  # b0
        out[1].append(F.pad(e[2][..., None], (n - 1, 0)))  # e0
        out[2].append(_add(r[1], F.pad(e[1][..., None], (n - 1, 0))))  # c0
        ct = F.pad(e[3][..., None, :], (0, 0, n - 1, 0))  # c_theta; the reads' rows are -d
        out[3].append(ct if r[2] is None else ct - r[2])
        out[4].append(F.pad(e[4][..., None, :], (0, 0, n - 1, 0)))  # e_theta
    return [torch.stack(f, 0) for f in out]
