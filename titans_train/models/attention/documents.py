"""DocCausal on the merge path (flash and its math twin): one varlen call per band shape.

A DocCausal rule is data: per row, which document and position each query and key has. We cut
each row into *runs* (maximal index ranges of one document with consecutive positions), pair
every query run with the key runs of the same document, and turn each pair into flash-style
bands with ``plan_pieces(Causal(q_pos0, k_pos0, window, segment), ...)``: inside a run a
position is its index plus a constant, so a pair is exactly a Causal rule. Each band becomes
one sequence of a flash-attn varlen call (cu_seqlens). flash-attn's varlen takes one window for
all sequences, so bands are grouped by (left, right): one call per group, usually just
(W-1, 0) or (-1, 0). A query row can appear in several bands (a document whose keys come in
two runs, e.g. a cache in its own group is *not* this case, but a non-consecutive cache is):
results are merged by log-sum-exp per row, and the backward runs each band against the global
out/lse, as in ``merge``.

The plan is built on the host once per rule object (one device sync) and cached on it, so the
caller should build one DocCausal per batch and reuse it across layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .merge import (
    MATH_PRIMITIVE,
    BlockPrimitive,
    _acc_dtype,
    _math_band_backward,
    _math_band_forward,
)
from .merge import plan_pieces as _plan_pieces
from .rules import Causal, DocCausal, Rule


class VarlenKernel(NamedTuple):
    """flash-attn varlen semantics on packed [N, H, d] tensors, sequences given by int32
    cu_seqlens on the tensors' device, keys bottom-right aligned per sequence, one (left, right)
    window for all. forward(q, k, v, cu_q, cu_k, max_q, max_k, left, right, scale) ->
    (out [Nq, H, d], lse [H, Nq], -inf on rows with no key); backward(dout, q, k, v, out, lse,
    cu_q, cu_k, max_q, max_k, left, right, scale) -> (dq, dk, dv), lse +inf on empty rows."""

    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


class DocBand(NamedTuple):
    b: int  # batch row
    t0: int  # query rows [t0, t1)
    t1: int
    s0: int  # key rows [s0, s1)
    s1: int
    left: int  # flash window_size; -1 = unbounded
    right: int


def _runs(doc: Tensor, pos: Tensor) -> list[list[tuple[int, int, int, int]]]:
    """Per row: (start, end, document, first position) of each maximal run (host tensors)."""
    new = torch.ones_like(doc, dtype=torch.bool)
    new[:, 1:] = (doc[:, 1:] != doc[:, :-1]) | (pos[:, 1:] != pos[:, :-1] + 1)
    out: list[list[tuple[int, int, int, int]]] = [[] for _ in range(doc.shape[0])]
    starts = new.nonzero().tolist()
    for i, (b, i0) in enumerate(starts):
        i1 = starts[i + 1][1] if i + 1 < len(starts) and starts[i + 1][0] == b else doc.shape[1]
        d = int(doc[b, i0])
        if d != -1:
            out[b].append((i0, i1, d, int(pos[b, i0])))
    return out


def doc_bands(rule: DocCausal) -> list[DocBand]:
    """Every (query run, key run) pair of one document as flash bands, in row order."""
    q_runs = _runs(rule.q_doc.cpu(), rule.q_pos.cpu())
    k_runs = _runs(rule.k_doc.cpu(), rule.k_pos.cpu())
    bands = []
    for b, (qr, kr) in enumerate(zip(q_runs, k_runs)):
        by_doc: dict[int, list[tuple[int, int, int]]] = {}
        for s0, s1, d, p in kr:
            by_doc.setdefault(d, []).append((s0, s1, p))
        for t0, t1, d, qp in qr:
            for s0, s1, kp in by_doc.get(d, []):
                causal = Causal(qp, kp, rule.window, rule.segment)
                for p in _plan_pieces(causal, t1 - t0, s1 - s0):
                    bands.append(
                        DocBand(b, t0 + p.t0, t0 + p.t1, s0 + p.s0, s0 + p.s1, p.left, p.right)
                    )
    return bands


class VarlenCall(NamedTuple):
    left: int
    right: int
    q_rows: Tensor  # [Nq] indices into the flattened [B * T] query rows
    k_rows: Tensor  # [Nk] indices into the flattened [B * S] key rows
    cu_q: Tensor  # [n + 1] int32
    cu_k: Tensor
    max_q: int
    max_k: int


def _calls(rule: DocCausal, n_q: int, n_k: int, device: torch.device) -> list[VarlenCall]:
    """The varlen calls of a rule, cached on the rule object per device."""
    cache = rule.__dict__.setdefault("_varlen_calls", {})  # frozen dataclass: no setattr
    if device in cache:
        return cache[device]
    groups: dict[tuple[int, int], list[DocBand]] = {}
    for band in doc_bands(rule):
        groups.setdefault((band.left, band.right), []).append(band)
    calls = []
    for (left, right), bands in sorted(groups.items()):
        q_rows = torch.cat([torch.arange(x.t0, x.t1) + x.b * n_q for x in bands])
        k_rows = torch.cat([torch.arange(x.s0, x.s1) + x.b * n_k for x in bands])
        len_q = torch.tensor([x.t1 - x.t0 for x in bands])
        len_k = torch.tensor([x.s1 - x.s0 for x in bands])
        cu_q = torch.cat([torch.zeros(1, dtype=torch.int64), len_q.cumsum(0)]).to(torch.int32)
        cu_k = torch.cat([torch.zeros(1, dtype=torch.int64), len_k.cumsum(0)]).to(torch.int32)
        calls.append(
            VarlenCall(
                left,
                right,
                q_rows.to(device),
                k_rows.to(device),
                cu_q.to(device),
                cu_k.to(device),
                int(len_q.max()),
                int(len_k.max()),
            )  # fmt: skip
        )
    cache[device] = calls
    return calls


def _packed(x: Tensor) -> Tensor:
    """[B, H, n, d] -> [B * n, H, d] (the row order of VarlenCall's indices)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b * n, h, d)


def _unpacked(x: Tensor, b: int) -> Tensor:
    return x.reshape(b, -1, *x.shape[1:]).transpose(1, 2)


def doc_forward(kernel: VarlenKernel, q: Tensor, k: Tensor, v: Tensor, rule: DocCausal):
    """(out [B, H, T, d], lse [B, H, T], -inf on rows with no key) of one DocCausal group."""
    b, h, n_q, _ = q.shape
    acc, scale = _acc_dtype(q), q.shape[-1] ** -0.5
    qf, kf, vf = _packed(q), _packed(k), _packed(v)
    rows, outs, lses = [], [], []
    for c in _calls(rule, n_q, k.shape[-2], q.device):
        o, l = kernel.forward(
            qf[c.q_rows], kf[c.k_rows], vf[c.k_rows], c.cu_q, c.cu_k, c.max_q, c.max_k,
            c.left, c.right, scale,
        )  # fmt: skip
        rows.append(c.q_rows)
        outs.append(o.to(acc))
        lses.append(l.to(acc).transpose(0, 1))  # [Nq, H]
    out = q.new_zeros(b * n_q, h, v.shape[-1], dtype=acc)
    lse = torch.full((b * n_q, h), float("-inf"), dtype=acc, device=q.device)
    if rows:  # merge bands that share a query row by log-sum-exp (usually one band per row)
        r, o, l = torch.cat(rows), torch.cat(outs), torch.cat(lses)
        top = lse.scatter_reduce(0, r[:, None].expand_as(l), l, "amax")
        top = torch.where(torch.isfinite(top), top, 0.0)
        w = torch.exp(l - top[r])  # 0 for a band row with no key (lse -inf)
        den = torch.zeros_like(lse).index_add(0, r, w)
        num = out.index_add(0, r, w[..., None] * torch.where(torch.isfinite(l)[..., None], o, 0))
        out = torch.where(den[..., None] > 0, num / den.clamp_min(1e-30)[..., None], 0.0)
        lse = torch.where(den > 0, top + torch.log(den), float("-inf"))
    return _unpacked(out.to(q.dtype), b), _unpacked(lse, b)


def doc_backward(kernel: VarlenKernel, dout, q, k, v, out, lse, rule: DocCausal):
    """(dq, dk, dv) of one DocCausal group against the global out and lse (+inf: no key)."""
    b, n_q, n_k = q.shape[0], q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5
    qf, kf, vf, of, gf = (_packed(x) for x in (q, k, v, out, dout))
    lf = lse.transpose(1, 2).reshape(b * n_q, -1)  # [B * T, H]
    dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    for c in _calls(rule, n_q, n_k, q.device):
        a, bk, bv = kernel.backward(
            gf[c.q_rows], qf[c.q_rows], kf[c.k_rows], vf[c.k_rows], of[c.q_rows],
            lf[c.q_rows].transpose(0, 1).contiguous(), c.cu_q, c.cu_k, c.max_q, c.max_k,
            c.left, c.right, scale,
        )  # fmt: skip
        dq.index_add_(0, c.q_rows, a.to(dq.dtype))
        dk.index_add_(0, c.k_rows, bk.to(dk.dtype))
        dv.index_add_(0, c.k_rows, bv.to(dv.dtype))
    return _unpacked(dq, b), _unpacked(dk, b), _unpacked(dv, b)


def with_documents(bands: BlockPrimitive, varlen: VarlenKernel) -> BlockPrimitive:
    """A block primitive that sends DocCausal groups to ``varlen`` and the rest to ``bands``."""

    def forward(q: Tensor, k: Tensor, v: Tensor, rule: Rule) -> tuple[Tensor, Tensor]:
        if isinstance(rule, DocCausal):
            return doc_forward(varlen, q, k, v, rule)
        return bands.forward(q, k, v, rule)

    def backward(dout, q, k, v, out, lse, rule):
        if isinstance(rule, DocCausal):
            return doc_backward(varlen, dout, q, k, v, out, lse, rule)
        return bands.backward(dout, q, k, v, out, lse, rule)

    return BlockPrimitive(forward, backward)


def _split(cu: Tensor) -> list[tuple[int, int]]:
    cu = cu.tolist()
    return list(zip(cu[:-1], cu[1:]))


def _math_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, left, right, scale):
    """Pure PyTorch twin of flash varlen (one band call per sequence; tests and CPU)."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=_acc_dtype(q), device=q.device)
    for (a, b), (c, d) in zip(_split(cu_q), _split(cu_k)):
        o, l = _math_band_forward(
            *(x.transpose(0, 1)[None] for x in (q[a:b], k[c:d], v[c:d])), left, right, scale
        )
        out[a:b] = o[0].transpose(0, 1)
        lse[:, a:b] = l[0]
    return out, lse


def _math_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, left, right, scale):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (a, b), (c, d) in zip(_split(cu_q), _split(cu_k)):
        grads = _math_band_backward(
            *(x.transpose(0, 1)[None] for x in (dout[a:b], q[a:b], k[c:d], v[c:d], out[a:b])),
            lse[None, :, a:b], left, right, scale,
        )  # fmt: skip
        for buf, g, (lo, hi) in zip((dq, dk, dv), grads, ((a, b), (c, d), (c, d))):
            buf[lo:hi] += g[0].transpose(0, 1)
    return dq, dk, dv


MATH_VARLEN_KERNEL = VarlenKernel(_math_varlen_forward, _math_varlen_backward)
# The math primitive with DocCausal support: what the flash primitive is, minus the kernels.
MATH_DOC_PRIMITIVE = with_documents(MATH_PRIMITIVE, MATH_VARLEN_KERNEL)
