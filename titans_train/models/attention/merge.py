"""Attention over several key groups as separate kernel calls merged by log-sum-exp.

flash-attn cannot take a mask made of several parts, so each group is attended on its own and
the partial results are merged: lse = logsumexp_g(lse_g), out = sum_g exp(lse_g - lse) * out_g.

Why a custom backward: flash-attn's autograd treats its softmax_lse output as a constant, so
differentiating through the merge formula above silently drops the d(lse_g) terms and gives
wrong gradients. Instead (as ring attention does) the merged forward is wrapped in one
autograd.Function, and each block's backward is run with the GLOBAL merged out and lse:
with P_g = exp(scale * q k_g^T - lse), dS_g = P_g * (dout v_g^T - rowsum(dout * out)), the sum
over blocks of the per-block gradients is exactly the gradient of the full softmax.

A block primitive has two functions (see ``BlockPrimitive``). Blocks are built from a "band
kernel" with flash-attn semantics: keys bottom-right aligned to queries, query i sees key j iff
i + (S - T) - left <= j <= i + (S - T) + right (-1 = unbounded). ``plan_pieces`` turns any rule
into such bands; the flash adapter and the pure-PyTorch ``MATH_PRIMITIVE`` share all of it, so
the CPU tests exercise everything but the CUDA kernel itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .rules import Causal, KeyGroup, Rule, Visible


class BlockPrimitive(NamedTuple):
    """forward(q, k, v, rule) -> (out [B,H,T,d], lse [B,H,T], -inf on rows with no key);
    backward(dout, q, k, v, out_global, lse_global, rule) -> (dq, dk, dv), where lse_global is
    +inf on rows with no key anywhere (so exp(s - lse) = 0 there, the flash-attn convention)."""

    forward: Callable[[Tensor, Tensor, Tensor, Rule], tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


class BandKernel(NamedTuple):
    """forward(q, k, v, left, right, scale) -> (out, lse); backward(dout, q, k, v, out, lse,
    left, right, scale) -> (dq, dk, dv). Tensors [B, H, len, d]; flash-attn band semantics."""

    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


class Piece(NamedTuple):
    t0: int  # query rows [t0, t1)
    t1: int
    s0: int  # key rows [s0, s1)
    s1: int
    left: int  # flash window_size; -1 = unbounded
    right: int


def _band(t0: int, t1: int, s0: int, s1: int, delta: int, window: int | None) -> Piece | None:
    """Causal band s - t in [delta - window + 1, delta] inside one box, trimmed so that every
    kept query row sees a key and every kept key is seen; then flash's left/right are >= 0."""
    lo = None if window is None else delta - window + 1
    s1 = min(s1, t1 + delta)  # keys past the last query's position are never seen
    if lo is not None:
        s0 = max(s0, t0 + lo)  # keys before the first query's window are never seen
        t1 = min(t1, s1 - lo)  # queries whose window starts after the last key see nothing
    t0 = max(t0, s0 - delta)  # queries before the first key see nothing
    if t0 >= t1 or s0 >= s1:
        return None
    # Local offset o = S - T; need s - t <= delta  <=>  j <= i + o + right.
    right = delta + t1 - s1
    left = -1 if window is None else window - 1 - right
    return Piece(t0, t1, s0, s1, left, right)


def plan_pieces(rule: Rule, n_q: int, n_k: int) -> list[Piece]:
    """Split one group's rule into flash-style bands with disjoint query rows."""
    if n_q == 0 or n_k == 0:
        return []
    if isinstance(rule, Visible):
        return [Piece(0, n_q, 0, n_k, -1, -1)]
    if not isinstance(rule, Causal):  # DocCausal is data-dependent: documents.with_documents
        raise ValueError(f"plan_pieces takes Visible or Causal rules, got {type(rule).__name__}")
    delta = rule.q_start - rule.k_start  # key index s visible to query index t iff s - t <= delta
    if rule.segment is None:
        boxes = [(0, n_q, 0, n_k)]
    else:
        c = rule.segment
        first, last = rule.q_start // c, (rule.q_start + n_q - 1) // c
        boxes = []
        for m in range(first, last + 1):  # one box per segment (T / C of them)
            t0, t1 = max(0, m * c - rule.q_start), min(n_q, (m + 1) * c - rule.q_start)
            s0, s1 = max(0, m * c - rule.k_start), min(n_k, (m + 1) * c - rule.k_start)
            boxes.append((t0, t1, s0, s1))
    pieces = [_band(*box, delta, rule.window) for box in boxes]
    return [p for p in pieces if p is not None]


def piecewise_primitive(kernel: BandKernel) -> BlockPrimitive:
    """A block primitive for any rule, from a band kernel (one kernel call per piece)."""

    def forward(q: Tensor, k: Tensor, v: Tensor, rule: Rule) -> tuple[Tensor, Tensor]:
        b, h, n_q, _ = q.shape
        scale = q.shape[-1] ** -0.5
        out = q.new_zeros(b, h, n_q, v.shape[-1])
        lse = torch.full((b, h, n_q), float("-inf"), dtype=_acc_dtype(q), device=q.device)
        for p in plan_pieces(rule, n_q, k.shape[-2]):
            o, l = kernel.forward(
                q[:, :, p.t0 : p.t1], k[:, :, p.s0 : p.s1], v[:, :, p.s0 : p.s1],
                p.left, p.right, scale,
            )  # fmt: skip
            out[:, :, p.t0 : p.t1] = o
            lse[:, :, p.t0 : p.t1] = l
        return out, lse

    def backward(dout, q, k, v, out, lse, rule):
        scale = q.shape[-1] ** -0.5
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for p in plan_pieces(rule, q.shape[-2], k.shape[-2]):
            rows, keys = slice(p.t0, p.t1), slice(p.s0, p.s1)
            a, b, c = kernel.backward(
                dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys],
                out[:, :, rows], lse[:, :, rows], p.left, p.right, scale,
            )  # fmt: skip
            dq[:, :, rows] += a
            dk[:, :, keys] += b
            dv[:, :, keys] += c
        return dq, dk, dv

    return BlockPrimitive(forward, backward)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _band_scores(q: Tensor, k: Tensor, left: int, right: int, scale: float) -> Tensor:
    n_q, n_k = q.shape[-2], k.shape[-2]
    i = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
    j = torch.arange(n_k, device=q.device)[None, :]
    ok = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    s = torch.matmul(q.to(_acc_dtype(q)), k.to(_acc_dtype(q)).transpose(-1, -2)) * scale
    return s.masked_fill(~ok, float("-inf"))


def _math_band_forward(q, k, v, left, right, scale):
    s = _band_scores(q, k, left, right, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.matmul(p, v.to(p.dtype)).to(q.dtype), lse


def _math_band_backward(dout, q, k, v, out, lse, left, right, scale):
    acc = _acc_dtype(q)
    p = torch.exp(_band_scores(q, k, left, right, scale) - lse[..., None].to(acc))
    dout, out = dout.to(acc), out.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.to(acc).transpose(-1, -2))
    ds = p * (dp - (dout * out).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.to(acc)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


MATH_BAND_KERNEL = BandKernel(_math_band_forward, _math_band_backward)
# Pure PyTorch twin of the flash primitive: same pieces, same conventions, runs on CPU.
MATH_PRIMITIVE = piecewise_primitive(MATH_BAND_KERNEL)


class _LseMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prim, rules, nope, q, q_nope, *kv):
        acc = _acc_dtype(q)
        outs, lses = [], []
        for i, rule in enumerate(rules):
            qq = q_nope if nope[i] else q
            o, l = prim.forward(qq, kv[2 * i], kv[2 * i + 1], rule)
            l = l.to(acc)
            outs.append(torch.where(torch.isfinite(l)[..., None], o.to(acc), 0.0))
            lses.append(l)
        stacked = torch.stack(lses)
        lse = torch.logsumexp(stacked, dim=0)  # -inf where no group has a visible key
        finite = torch.isfinite(lse)
        w = torch.exp(stacked - torch.where(finite, lse, 0.0))
        out = sum(w[i][..., None] * outs[i] for i in range(len(outs))).to(q.dtype)
        lse_bwd = torch.where(finite, lse, float("inf"))
        ctx.prim, ctx.rules, ctx.nope = prim, rules, nope
        ctx.save_for_backward(q, q_nope, out, lse_bwd, *kv)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, q_nope, out, lse, *kv = ctx.saved_tensors
        acc = _acc_dtype(q)
        dq = torch.zeros_like(q, dtype=acc)
        dq_nope = None if q_nope is None else torch.zeros_like(q_nope, dtype=acc)
        dkv = []
        for i, rule in enumerate(ctx.rules):
            qq = q_nope if ctx.nope[i] else q
            a, dk, dv = ctx.prim.backward(dout, qq, kv[2 * i], kv[2 * i + 1], out, lse, rule)
            if ctx.nope[i]:
                dq_nope += a
            else:
                dq += a
            dkv += [dk, dv]
        dq_nope = None if dq_nope is None else dq_nope.to(q_nope.dtype)
        return (None, None, None, dq.to(q.dtype), dq_nope, *dkv)


def merge_attend(
    q: Tensor, groups: list[KeyGroup], q_nope: Tensor | None, primitive: BlockPrimitive
) -> Tensor:
    """Attention over the union of the groups' keys: one primitive call per group, LSE-merged."""
    dv = groups[0].v.shape[-1]
    groups = [g for g in groups if g.k.shape[-2] > 0]
    if not groups:  # no key at all: every row is empty
        return q.new_zeros(*q.shape[:-1], dv)
    rules = tuple(g.rule for g in groups)
    nope = tuple(isinstance(r, Visible) for r in rules)
    kv = [t for g in groups for t in (g.k, g.v)]
    return _LseMerge.apply(primitive, rules, nope, q, q_nope, *kv)
