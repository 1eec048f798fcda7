"""Window and segment attention with persistent tokens, over three backends.

``attend(q, groups)`` computes one softmax over the union of the keys of all groups; each group
says which queries see its keys (``Visible``, ``Causal`` or the per-row ``DocCausal`` of packed
documents, see ``rules``). Backends:

- "sdpa": ``scaled_dot_product_attention`` with an explicit boolean mask. Runs anywhere, has
  autograd, and is the reference the other two are tested against.
- "flex": ``flex_attention`` with a ``mask_mod`` (compiled on CUDA; forward-only on CPU).
- "flash": flash-attn, one call per group (and per segment), merged by log-sum-exp with a
  custom backward (``merge``, ``flash``); DocCausal groups through flash's varlen API
  (``documents``). CUDA, fp16/bf16 only.

``select_backend`` picks flash, then flex, then sdpa; an explicit choice that cannot run raises.
"""

from __future__ import annotations

from math import inf

import torch
import torch.nn.functional as F
from torch import Tensor

from .flash import (
    flash_api,
    flash_primitive,
    flash_unusable_reason_for,
)
from .flex import (
    flex_attend,
    flex_unusable_reason,
    flex_unusable_reason_for,
)
from .merge import merge_attend
from .rules import (
    Causal,
    DocCausal,
    KeyGroup,
    Visible,
    concat_groups,
    dense_mask,
    key_layout,
    per_row,
)

__all__ = ["BACKENDS", "attend", "attention_backend_report", "select_backend"]

BACKENDS = ("flash", "flex", "sdpa")


def _needs_grad(tensors: list[Tensor | None]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def select_backend(q: Tensor, override: str = "auto") -> str:
    """Name of the backend to use for this query tensor: "flash", "flex" or "sdpa".

    "auto": flash on CUDA (sm80+) with fp16/bf16, a supported head dim and flash-attn
    importable; else flex on CUDA when available; else sdpa. An explicit backend that cannot run
    on this device/dtype raises ValueError naming the backend and the reason (never a silent
    fallback).
    """
    return _choose(q.device, q.dtype, q.shape[-1], override, _needs_grad([q]))


def _choose(
    device: torch.device, dtype: torch.dtype, head_dim: int | None, override: str, grad: bool
) -> str:
    if override not in ("auto", *BACKENDS):
        raise ValueError(f"unknown attention backend {override!r}; expected auto|flash|flex|sdpa")
    if override == "sdpa":
        return "sdpa"
    if override == "flash":
        reason = flash_unusable_reason_for(device, dtype, head_dim)
        if reason:
            raise ValueError(f"attention backend 'flash' cannot run: {reason}")
        return "flash"
    if override == "flex":
        reason = flex_unusable_reason_for(device, needs_grad=grad)
        if reason:
            raise ValueError(f"attention backend 'flex' cannot run: {reason}")
        return "flex"
    if flash_unusable_reason_for(device, dtype, head_dim) is None:
        return "flash"
    if device.type == "cuda" and flex_unusable_reason_for(device, needs_grad=False) is None:
        return "flex"
    return "sdpa"


def attention_backend_report(
    device: torch.device | str,
    dtype: torch.dtype,
    override: str = "auto",
    head_dim: int | None = None,
) -> dict:
    """What ``attend`` will run for activations of this device/dtype/head dim, and why.

    Keys: backend ("flash" | "flex" | "sdpa", or None when an explicit override cannot run),
    override, device, dtype, head_dim, flash_available, flash_reason (None when usable; the
    first obstacle), flash_import_error (why flash_attn itself is unusable, else None),
    flash_version, flash_signature, and error (the override's refusal, else None). Pure: it
    allocates nothing and may be logged, put in the W&B config and in metrics.jsonl.
    """
    device = torch.device(device)
    api = flash_api()
    flash_reason = flash_unusable_reason_for(device, dtype, head_dim)
    try:
        backend, error = _choose(device, dtype, head_dim, override, grad=False), None
    except ValueError as e:
        backend, error = None, str(e)
    return {
        "backend": backend,
        "override": override,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "head_dim": head_dim,
        "flash_available": flash_reason is None,
        "flash_reason": flash_reason,
        "flash_import_error": api if isinstance(api, str) else None,
        "flash_version": None if isinstance(api, str) else api.version,
        "flash_signature": None if isinstance(api, str) else api.style,
        "error": error,
    }


def _check(q: Tensor, groups: list[KeyGroup], q_nope: Tensor | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, T, d], got shape {tuple(q.shape)}")
    if not groups:
        raise ValueError("attend needs at least one KeyGroup")
    b, h, t, d = q.shape
    dv = groups[0].v.shape[-1]
    for i, g in enumerate(groups):
        if not isinstance(g.rule, (Visible, Causal, DocCausal)):
            raise ValueError(
                f"group {i}: rule must be Visible, Causal or DocCausal, got {g.rule!r}"
            )
        if g.k.dim() != 4 or g.k.shape[:2] != (b, h) or g.k.shape[-1] != d:
            raise ValueError(f"group {i}: k must be [{b}, {h}, S, {d}], got {tuple(g.k.shape)}")
        if g.v.shape[:-1] != g.k.shape[:-1] or g.v.shape[-1] != dv:
            raise ValueError(f"group {i}: v must be [{b}, {h}, S, {dv}], got {tuple(g.v.shape)}")
        if g.k.dtype != q.dtype or g.v.dtype != q.dtype or g.k.device != q.device:
            raise ValueError(f"group {i}: k, v must match q's dtype and device")
        if isinstance(g.rule, DocCausal):
            _check_docs(i, g.rule, b, t, g.k.shape[-2], q.device)
    if any(isinstance(g.rule, Visible) for g in groups):
        if q_nope is None:
            raise ValueError("q_nope is required when a group is Visible (position-free keys)")
        if q_nope.shape != q.shape:
            raise ValueError(f"q_nope must have q's shape {tuple(q.shape)}")


def _check_docs(i: int, r: DocCausal, b: int, t: int, s: int, device: torch.device) -> None:
    for name, want in (("q_doc", (b, t)), ("k_doc", (b, s))):
        x = getattr(r, name)
        if tuple(x.shape) != want:
            raise ValueError(
                f"group {i}: DocCausal.{name} must be [{want[0]}, {want[1]}] "
                f"(batch, {'queries' if name == 'q_doc' else 'keys'}), got {tuple(x.shape)}"
            )
    if r.q_doc.device != device:
        raise ValueError(f"group {i}: DocCausal tensors are on {r.q_doc.device}, q is on {device}")


# Query block of the windowed SDPA path: a dense mask over all keys is [T, S], quadratic in T;
# blocks of this many queries against only the keys their windows reach make it O(T * (block+W)).
SDPA_BLOCK = 256


def _sdpa_attend(q: Tensor, groups: list[KeyGroup], q_nope: Tensor | None) -> Tensor:
    causal = [g.rule for g in groups if not isinstance(g.rule, Visible)]
    # DocCausal blocks pay off without a window too: a block reaches only its own documents.
    local = [r.window is not None or isinstance(r, DocCausal) for r in causal]
    if q.shape[-2] > SDPA_BLOCK and causal and all(local):
        return _sdpa_blocks(q, groups, q_nope, SDPA_BLOCK)
    return _sdpa_dense(q, groups, q_nope)


def _doc_span(r: DocCausal, t0: int, t1: int) -> tuple[int, int]:
    """A key index span [s0, s1) holding every key that queries [t0, t1) can see (a superset:
    the block's mask is exact). A key of document d can only be seen if its position lies in
    [min - W + 1, max] of the positions of d's queries in the block, per row (no lower bound
    without a window). Tight when each
    document's block queries have consecutive positions (packed rows). O(B * (tb + S))."""
    qd, qp = r.q_doc[:, t0:t1], r.q_pos[:, t0:t1]
    batch, tb = qd.shape
    ids, inv = torch.unique(torch.cat([qd, r.k_doc], 1), return_inverse=True)
    row = torch.arange(batch, device=qd.device)[:, None] * ids.numel()
    iq, ik = (inv[:, :tb] + row).flatten(), inv[:, tb:] + row
    real, big = qd != -1, torch.iinfo(torch.int64).max
    lo = torch.full((batch * ids.numel(),), big, device=qd.device)
    lo = lo.scatter_reduce(0, iq, torch.where(real, qp, big).flatten(), "amin")
    hi = torch.full_like(lo, -big).scatter_reduce(
        0, iq, torch.where(real, qp, -big).flatten(), "amax"
    )
    cand = r.k_pos <= hi[ik]
    if r.window is not None:
        cand = cand & (r.k_pos >= lo[ik] - (r.window - 1))
    else:  # no window: every earlier key of a document that has a query in the block
        cand = cand & (lo[ik] < big)
    cols = cand.any(dim=0).nonzero().flatten()
    if cols.numel() == 0:
        return 0, 0
    s0, s1 = cols[[0, -1]].tolist()  # one host sync per block
    return s0, s1 + 1


def _doc_block(g: KeyGroup, t0: int, t1: int) -> KeyGroup | None:
    """The DocCausal group restricted to queries [t0, t1) and to the keys they can reach.

    The sub-rule and its [B, tb, span] mask are cached on the rule, so a rule reused across
    layers (build one DocCausal per batch) computes them once."""
    r = g.rule
    cache = r.__dict__.setdefault("_sdpa_blocks", {})  # frozen dataclass: no setattr
    if (t0, t1) not in cache:
        s0, s1 = _doc_span(r, t0, t1)
        sub = None
        if s1 > s0:
            qd, qp = r.q_doc[:, t0:t1], r.q_pos[:, t0:t1]
            sub = DocCausal(qd, qp, r.k_doc[:, s0:s1], r.k_pos[:, s0:s1], r.window, r.segment)
            sub.__dict__["_mask"] = dense_mask(key_layout([KeyGroup(g.k[..., s0:s1, :], g.v, sub)]),
                                               t1 - t0, qd.device)  # fmt: skip
        cache[(t0, t1)] = (s0, s1, sub)
    s0, s1, sub = cache[(t0, t1)]
    return None if sub is None else KeyGroup(g.k[..., s0:s1, :], g.v[..., s0:s1, :], sub)


def _sdpa_blocks(q: Tensor, groups: list[KeyGroup], q_nope: Tensor | None, block: int) -> Tensor:
    """Sliding windows block by block: the same softmax, since the keys left out of a block are
    masked for all of its queries anyway. Visible groups (persistent tokens) go to every block."""
    outs = []
    for t0 in range(0, q.shape[-2], block):
        t1 = min(q.shape[-2], t0 + block)
        sub = []
        for g in groups:
            r = g.rule
            if isinstance(r, DocCausal):
                g = _doc_block(g, t0, t1)
                if g is None:
                    continue
            elif isinstance(r, Causal):  # keys kp with qp0 - W < kp <= qp1 can be visible
                qp0, qp1 = r.q_start + t0, r.q_start + t1 - 1
                s0 = min(max(0, qp0 - r.window + 1 - r.k_start), g.k.shape[-2])
                s1 = max(s0, min(g.k.shape[-2], qp1 - r.k_start + 1))
                if s1 == s0:
                    continue
                rule = Causal(qp0, r.k_start + s0, r.window, r.segment)
                g = KeyGroup(g.k[..., s0:s1, :], g.v[..., s0:s1, :], rule)
            sub.append(g)
        qb = q[..., t0:t1, :]
        if not sub:  # no key visible to any query of the block: output 0, as in the dense path
            outs.append(qb.new_zeros(*qb.shape[:-1], groups[0].v.shape[-1]))
            continue
        outs.append(_sdpa_dense(qb, sub, None if q_nope is None else q_nope[..., t0:t1, :]))
    return torch.cat(outs, dim=-2)


# Additive masks (0 / -inf) of the CPU path below, by (normalised layout, queries, dtype); small
# masks only, few of them (a training run meets one layout per segment phase).
_ADD_MASKS: dict = {}
_ADD_MASK_MAX = (64, 1 << 20)  # entries, elements per mask


def _shifted(rule):
    """A Causal rule moved by a multiple of its segment (or to k_start 0 without segments): the
    same visibility for every (t, s), so masks of successive MAC segments share one key."""
    if not isinstance(rule, Causal):
        return rule
    shift = rule.k_start if rule.segment is None else rule.k_start // rule.segment * rule.segment
    return Causal(rule.q_start - shift, rule.k_start - shift, rule.window, rule.segment)


def _additive_mask(groups: list[KeyGroup], n_q: int, device, dtype) -> Tensor | None:
    """[T, S] 0 / -inf for ``dense_mask``, cached; None when some query sees no key."""
    layout = tuple((_shifted(r), off, n) for r, off, n in key_layout(groups))
    key = (layout, n_q, str(device), dtype)
    if key not in _ADD_MASKS:
        with torch.inference_mode(False), torch.no_grad():  # usable by later training calls
            mask = dense_mask(layout, n_q, device)
            add = None
            if bool(mask.any(-1).all()):
                add = torch.zeros(mask.shape, dtype=dtype, device=device)
                add.masked_fill_(~mask, -inf)
        small = len(_ADD_MASKS) < _ADD_MASK_MAX[0] and mask.numel() <= _ADD_MASK_MAX[1]
        if not small or type(mask) is not torch.Tensor:  # never cache a mode's tensor subclass
            return add
        _ADD_MASKS[key] = add
    return _ADD_MASKS[key]


def _cpu_mixed(q: Tensor, groups: list[KeyGroup], q_nope: Tensor, scale: float) -> Tensor | None:
    """Causal and Visible groups on CPU, where SDPA would take its math path for the widened
    q' = [q | q_nope] of ``concat_groups`` (q' and v differ in head dim): scores of each run of
    same-kind groups against q or q_nope, one cached additive mask, softmax, values. Half the
    time of that path at the tiny MAC's sizes (no widening, mask conversion or safe softmax;
    issue 16). None when some query sees no key (the caller's path handles it)."""
    add = _additive_mask(groups, q.shape[-2], q.device, q.dtype)
    if add is None:
        return None
    scores, run, kind = [], [], None
    for g in [*groups, None]:
        k = None if g is None else isinstance(g.rule, Visible)
        if run and k != kind:
            keys = torch.cat(run, dim=2) if len(run) > 1 else run[0]
            scores.append(torch.matmul(q_nope if kind else q, keys.transpose(-1, -2)))
            run = []
        if g is not None:
            run.append(g.k)
            kind = k
    s = torch.cat(scores, dim=-1)
    p = torch.softmax(torch.add(add.to(s.dtype), s, alpha=scale), dim=-1)
    return torch.matmul(p, torch.cat([g.v for g in groups], dim=2))


def _sdpa_dense(q: Tensor, groups: list[KeyGroup], q_nope: Tensor | None) -> Tensor:
    scale = q.shape[-1] ** -0.5  # the real head dim, also when q is widened to [q | q_nope]
    if len(groups) == 1:
        g, r = groups[0], groups[0].rule
        n_q, n_k = q.shape[-2], g.k.shape[-2]
        plain = isinstance(r, Causal) and r.window is None and r.segment is None
        if plain and n_q == n_k and r.q_start == r.k_start:  # square causal: no mask needed
            return F.scaled_dot_product_attention(q, g.k, g.v, is_causal=True, scale=scale)
    kinds = {isinstance(g.rule, Visible) for g in groups}
    if q.device.type == "cpu" and len(kinds) == 2 and not per_row(key_layout(groups)):
        out = _cpu_mixed(q, groups, q_nope, scale)
        if out is not None:
            return out
    qq, kk, vv = concat_groups(q, groups, q_nope)
    mask = dense_mask(key_layout(groups), q.shape[-2], q.device)
    if mask.dim() == 3:  # per row (DocCausal): [B, T, S] -> [B, 1, T, S], broadcast over heads
        mask = mask[:, None]
    has_key = mask.any(dim=-1, keepdim=True)  # [T, 1] or [B, 1, T, 1]
    if bool(has_key.all()):
        return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
    # Rows with no visible key would be 0/0. Let them see every key (finite, harmless), then
    # zero them: the output is 0 and no gradient flows from those rows.
    out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask | ~has_key, scale=scale)
    return torch.where(has_key, out, 0.0)


def attend(
    q: Tensor,
    groups: list[KeyGroup],
    *,
    q_nope: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """q: [B, H, T, d] (rotated). Each group's rule is Visible, Causal or DocCausal (packed
    documents, per row). q_nope: [B, H, T, d] unrotated, required iff any group is
    Visible (ignored otherwise). Softmax is over the union of all groups' visible keys, scale
    1/sqrt(d). Returns [B, H, T, d_v]. A query row with no visible key returns zeros (never NaN).
    """
    _check(q, groups, q_nope)
    if not any(isinstance(g.rule, Visible) for g in groups):
        q_nope = None
    name = select_backend(q, backend)
    kept = [g for g in groups if g.k.shape[-2] > 0]
    if not kept:  # no key at all (e.g. an empty cache): every row is empty
        return q.new_zeros(*q.shape[:-1], groups[0].v.shape[-1])
    if name == "flash":
        if kept[0].v.shape[-1] != q.shape[-1]:
            raise ValueError("attention backend 'flash' needs v to have q's head dim")
        return merge_attend(q, kept, q_nope, flash_primitive())
    if name == "flex":
        tensors = [q, q_nope, *(t for g in kept for t in (g.k, g.v))]
        reason = flex_unusable_reason(q, needs_grad=_needs_grad(tensors))
        if reason:
            raise ValueError(f"attention backend 'flex' cannot run: {reason}")
        return flex_attend(q, kept, q_nope, key_layout(kept))
    return _sdpa_attend(q, kept, q_nope)
