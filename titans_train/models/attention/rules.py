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


Rule = Visible | Causal


@dataclass
class KeyGroup:
    k: Tensor  # [B, H, S, d] (RoPE-rotated by the caller for Causal groups; raw for Visible)
    v: Tensor  # [B, H, S, d]
    rule: Visible | Causal


def rule_allows(rule: Rule, t: Tensor, s: Tensor) -> Tensor:
    """Boolean visibility of key index s to query index t under one rule.

    t and s are broadcastable integer tensors of indices *within* the query block and the group.
    Works on plain tensors (SDPA mask) and inside a flex ``mask_mod``.
    """
    if isinstance(rule, Visible):
        return (t >= 0) & (s >= 0)  # all True, with the broadcast shape
    qp = t + rule.q_start
    kp = s + rule.k_start
    ok = kp <= qp
    if rule.window is not None:
        ok = ok & (qp - kp < rule.window)
    if rule.segment is not None:
        ok = ok & (
            torch.div(kp, rule.segment, rounding_mode="floor")
            == torch.div(qp, rule.segment, rounding_mode="floor")
        )
    return ok


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


def layout_allows(layout: Layout, t: Tensor, kv: Tensor) -> Tensor:
    """Visibility on the concatenated key axis: dispatch kv to its group, then apply the rule.

    The Python loop runs over groups (a handful), never over positions.
    """
    allowed = (t < 0) & (kv < 0)  # all False, with the broadcast shape
    for rule, off, n in layout:
        inside = (kv >= off) & (kv < off + n)
        allowed = allowed | (inside & rule_allows(rule, t, kv - off))
    return allowed


def dense_mask(layout: Layout, n_queries: int, device: torch.device) -> Tensor:
    """[T, S_total] boolean mask, True where the query may see the key."""
    blocks = []
    t = torch.arange(n_queries, device=device)[:, None]
    for rule, _, n in layout:
        blocks.append(rule_allows(rule, t, torch.arange(n, device=device)[None, :]))
    return torch.cat(blocks, dim=1)


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
