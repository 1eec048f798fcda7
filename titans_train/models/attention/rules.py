"""Visibility rules for attention key groups, shared by every backend.

A call to ``attend`` gets a list of key groups. Each group carries its own rule saying which
queries may see which of its keys. This file holds the rules, the one vectorised function that
evaluates them, and the key-axis layout used by the single-call backends (SDPA, flex).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Visible:
    """Keys visible to every query, position-free (persistent tokens; MAC 'memory_tokens' prefix).
    Scored against the UNROTATED query q_nope (so they carry no RoPE position)."""


@dataclass(frozen=True)
class Causal:
    """Key at absolute position kp = k_start + s is visible to query qp = q_start + t iff
       kp <= qp  and  (window is None or qp - kp < window)  and
       (segment is None or kp // segment == qp // segment).
    A window of W therefore means W keys INCLUDING the query itself
    (flash-attn window_size=(W-1, 0)).
    """

    q_start: int
    k_start: int
    window: int | None = None
    segment: int | None = None

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"Causal.window must be >= 1 or None, got {self.window}")
        if self.segment is not None and self.segment < 1:
            raise ValueError(f"Causal.segment must be >= 1 or None, got {self.segment}")


@dataclass(frozen=True, eq=False)  # eq=False: hashed and compared by identity (holds tensors)
class DocCausal:
    """Packed documents, given per row. Query (b, t) has document ``q_doc[b, t]`` (-1 = padding)
    and position ``q_pos[b, t]`` inside it; key (b, s) has ``k_doc[b, s]``, ``k_pos[b, s]``.
    Key (b, s) is visible to query (b, t) iff
       k_doc == q_doc != -1  and  k_pos <= q_pos  and
       (window is None or q_pos - k_pos < window)  and
       (segment is None or k_pos // segment == q_pos // segment).
    All four tensors are int64 [B, T] (queries) and [B, S] (keys), on q's device. Positions
    restart at 0 at every document start (docs/attention.md, "Packed documents").
    Backends cache data-dependent plans and masks on the rule object: build one per batch,
    reuse it across layers, and do not modify its tensors in place afterwards.
    """

    q_doc: Tensor
    q_pos: Tensor
    k_doc: Tensor
    k_pos: Tensor
    window: int | None = None
    segment: int | None = None

    def __post_init__(self) -> None:
        for name in ("q_doc", "q_pos", "k_doc", "k_pos"):
            x = getattr(self, name)
            if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype != torch.int64:
                got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"DocCausal.{name} must be an int64 tensor [B, n], got {got}")
        if self.q_pos.shape != self.q_doc.shape:
            raise ValueError(
                f"DocCausal.q_pos must have q_doc's shape {tuple(self.q_doc.shape)}, "
                f"got {tuple(self.q_pos.shape)}"
            )
        if self.k_pos.shape != self.k_doc.shape:
            raise ValueError(
                f"DocCausal.k_pos must have k_doc's shape {tuple(self.k_doc.shape)}, "
                f"got {tuple(self.k_pos.shape)}"
            )
        if self.k_doc.shape[0] != self.q_doc.shape[0]:
            raise ValueError(
                f"DocCausal.k_doc has batch {self.k_doc.shape[0]}, q_doc has {self.q_doc.shape[0]}"
            )
        if len({x.device for x in (self.q_doc, self.q_pos, self.k_doc, self.k_pos)}) != 1:
            raise ValueError("DocCausal.q_doc, q_pos, k_doc, k_pos must be on one device")
        if self.window is not None and self.window < 1:
            raise ValueError(f"DocCausal.window must be >= 1 or None, got {self.window}")
        if self.segment is not None and self.segment < 1:
            raise ValueError(f"DocCausal.segment must be >= 1 or None, got {self.segment}")


Rule = Visible | Causal | DocCausal


def document_positions(
    doc_starts: Tensor, carry: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """(doc, pos, carry) for DocCausal and rope_angles_at, from doc_starts (bool [B, T], True at
    the first token of a document). Ids count the starts, so they only mean something within a
    row. carry = (doc id, next position) per row [B] from the previous call, so a document not
    marked at position 0 continues; None means a fresh document at position 0. The returned
    carry continues this call. Vectorised (cumsum/cummax), no loop over documents."""
    if doc_starts.dim() != 2 or doc_starts.dtype != torch.bool:
        raise ValueError(
            f"doc_starts must be a bool tensor [B, T], got {doc_starts.dtype} "
            f"{tuple(doc_starts.shape)}"
        )
    batch, n = doc_starts.shape
    dev = doc_starts.device
    doc0, pos0 = (
        carry if carry is not None else (torch.zeros(batch, dtype=torch.int64, device=dev),) * 2
    )
    if doc0.shape != (batch,) or pos0.shape != (batch,):
        raise ValueError(
            f"carry must be two int64 tensors [{batch}], got {doc0.shape}, {pos0.shape}"
        )
    t = torch.arange(n, device=dev).expand(batch, n)
    doc = doc0[:, None] + doc_starts.long().cumsum(1)
    last = torch.where(doc_starts, t, -1).cummax(1).values  # index of the latest start, or -1
    pos = torch.where(last >= 0, t - last, pos0[:, None] + t)
    return doc, pos, (doc[:, -1], pos[:, -1] + 1)


@dataclass
class KeyGroup:
    k: Tensor  # [B, H, S, d] (RoPE-rotated by the caller for Causal groups; raw for Visible)
    v: Tensor  # [B, H, S, d]
    rule: Visible | Causal | DocCausal


def _positions_allow(qp: Tensor, kp: Tensor, window: int | None, segment: int | None) -> Tensor:
    ok = kp <= qp
    if window is not None:
        ok = ok & (qp - kp < window)
    if segment is not None:
        ok = ok & (
            torch.div(kp, segment, rounding_mode="floor")
            == torch.div(qp, segment, rounding_mode="floor")
        )
    return ok


def rule_allows(rule: Rule, t: Tensor, s: Tensor, b: Tensor | None = None) -> Tensor:
    """Boolean visibility of key index s to query index t under one rule.

    t and s are broadcastable integer tensors of indices *within* the query block and the group;
    b (batch row indices, broadcastable too) is needed by DocCausal only. Works on plain tensors
    (SDPA mask) and inside a flex ``mask_mod``.
    """
    if isinstance(rule, Visible):
        return (t >= 0) & (s >= 0)  # all True, with the broadcast shape
    if isinstance(rule, DocCausal):
        if b is None:
            raise ValueError("DocCausal visibility needs the batch row index b")
        qd, kd = rule.q_doc[b, t], rule.k_doc[b, s]
        same = (qd == kd) & (qd != -1)
        return same & _positions_allow(
            rule.q_pos[b, t], rule.k_pos[b, s], rule.window, rule.segment
        )
    return _positions_allow(t + rule.q_start, s + rule.k_start, rule.window, rule.segment)


# (rule, offset of the group on the concatenated key axis, number of keys)
Layout = tuple[tuple[Rule, int, int], ...]


def key_layout(groups: list[KeyGroup]) -> Layout:
    """Where each group's keys sit once all groups are concatenated along the key axis."""
    out, off = [], 0
    for g in groups:
        n = g.k.shape[-2]
        out.append((g.rule, off, n))
        off += n
    return tuple(out)


def layout_allows(layout: Layout, t: Tensor, kv: Tensor, b: Tensor | None = None) -> Tensor:
    """Visibility on the concatenated key axis: dispatch kv to its group, then apply the rule.

    The Python loop runs over groups (a handful), never over positions. b: batch row (DocCausal).
    """
    allowed = (t < 0) & (kv < 0)  # all False, with the broadcast shape
    for rule, off, n in layout:
        inside = (kv >= off) & (kv < off + n)
        s = kv - off
        if isinstance(rule, DocCausal):  # per-key tensors are indexed: keep s in range
            s = s.clamp(0, n - 1)
        allowed = allowed | (inside & rule_allows(rule, t, s, b))
    return allowed


def per_row(layout: Layout) -> bool:
    """True when some rule depends on the batch row (DocCausal): masks are then [B, T, S]."""
    return any(isinstance(rule, DocCausal) for rule, _, _ in layout)


def dense_mask(layout: Layout, n_queries: int, device: torch.device) -> Tensor:
    """[T, S_total] boolean mask, True where the query may see the key; [B, T, S_total] when a
    rule is per row (DocCausal)."""
    blocks = []
    t = torch.arange(n_queries, device=device)[:, None]
    b = None
    if per_row(layout):
        batch = next(r.q_doc.shape[0] for r, _, _ in layout if isinstance(r, DocCausal))
        b, t = torch.arange(batch, device=device)[:, None, None], t[None]
    for rule, _, n in layout:
        if "_mask" in rule.__dict__:  # a DocCausal mask cached by the block-local SDPA path
            blocks.append(rule.__dict__["_mask"])
            continue
        s = torch.arange(n, device=device)[None, :]
        blocks.append(rule_allows(rule, t, s if b is None else s[None], b))
    if b is not None:
        blocks = [m.expand(b.shape[0], n_queries, m.shape[-1]) for m in blocks]
    return torch.cat(blocks, dim=-1)


def concat_groups(
    q: Tensor, groups: list[KeyGroup], q_nope: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """One (query, key, value) triple for a single-kernel backend.

    Causal keys are scored with the rotated q, Visible keys with q_nope. When both kinds are
    present we use q' = [q | q_nope], Causal k' = [k | 0], Visible k' = [0 | k]: then
    q'.k' equals the right dot product for every key, and one kernel call covers all groups.
    The caller must pass scale = 1/sqrt(d) explicitly, since q' has head dim 2d.
    """
    kinds = {isinstance(g.rule, Visible) for g in groups}
    v = torch.cat([g.v for g in groups], dim=2)
    if kinds == {False}:
        return q, torch.cat([g.k for g in groups], dim=2), v
    assert q_nope is not None
    if kinds == {True}:
        return q_nope, torch.cat([g.k for g in groups], dim=2), v
    keys = []
    for g in groups:
        zero = torch.zeros_like(g.k)
        keys.append(torch.cat([zero, g.k] if isinstance(g.rule, Visible) else [g.k, zero], dim=-1))
    return torch.cat([q, q_nope], dim=-1), torch.cat(keys, dim=2), v
