"""flex_attention backend: one kernel call over all groups, masked by a ``mask_mod``.

The groups are concatenated exactly as for SDPA (``concat_groups``) and the rules become a
``mask_mod`` over the concatenated key axis. On CUDA flex must run compiled (eager flex is an
unfused O(T*S) reference), so we keep one module-level compiled function and cache block masks
by (layout, shape, device). On CPU flex has no backward ("FlexAttention does not support
backward on CPU"), so it is forward-only there and runs eagerly (tests use it for parity).

Recompiles: the compiled function is specialised (dynamic=False) and dynamo guards on the
integers a ``mask_mod`` closes over. MAC attends segment by segment with absolute positions
(``Causal(q_start=pos, ...)``), so a mask over absolute positions is a new guard per segment and
dynamo stops compiling after ``recompile_limit`` (8) graphs. We therefore build every mask from
the *relative* rule (``relative_rule``): equal segment layouts share one block mask and one graph.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from .rules import (
    Causal,
    DocCausal,
    KeyGroup,
    Layout,
    Rule,
    concat_groups,
    layout_allows,
    per_row,
)

_BLOCK_MASKS: OrderedDict = OrderedDict()
_MAX_BLOCK_MASKS = 64  # a training run uses a few layouts; generation adds one per length


@functools.cache
def _flex_import():  # -> module or error string
    try:
        from torch.nn.attention import flex_attention as flex
    except Exception as e:
        return f"torch.nn.attention.flex_attention does not import ({type(e).__name__}: {e})"
    return flex


@functools.cache
def _compiled_flex(backend: str | Callable = "inductor") -> Callable:
    # One compiled callable per compile backend; dynamo specialises it per shape as needed.
    return torch.compile(_flex_import().flex_attention, dynamic=False, backend=backend)


def relative_rule(rule: Rule) -> Rule:
    """The same visibility with positions shifted to the group's own origin.

    Causal visibility depends only on qp - kp and, with segments, on qp // C == kp // C; both are
    unchanged when q_start and k_start drop by the same multiple of C (or by any amount when
    there are no segments). So MAC's per-segment rules Causal(q_start=i*C, k_start=i*C, segment=C)
    all become Causal(0, 0, segment=C).
    """
    if not isinstance(rule, Causal):
        return rule
    c = rule.segment
    shift = rule.k_start if c is None else (min(rule.q_start, rule.k_start) // c) * c
    return Causal(rule.q_start - shift, rule.k_start - shift, rule.window, c)


def flex_unusable_reason(q: Tensor, needs_grad: bool) -> str | None:
    """Why flex_attention cannot run here, or None if it can."""
    return flex_unusable_reason_for(q.device, needs_grad)


def flex_unusable_reason_for(device: torch.device, needs_grad: bool) -> str | None:
    """Why flex_attention cannot run on this device, or None if it can."""
    imported = _flex_import()
    if isinstance(imported, str):
        return imported
    if needs_grad and device.type != "cuda":
        return (
            f"flex_attention is forward-only on {device.type} (FlexAttention does not support "
            "backward on CPU); use backend='sdpa' for training on CPU"
        )
    return None


def _doc_block_mask(layout: Layout, batch: int, n_q: int, n_k: int, device: torch.device):
    """Per-row block mask for DocCausal: the mask_mod indexes the rule's [B, n] document and
    position tensors by b. It depends on data, so it is cached on the DocCausal rule object
    (not in the module cache): build one rule per batch and reuse it across layers."""
    owner = next(rule for rule, _, _ in layout if isinstance(rule, DocCausal))
    cache = owner.__dict__.setdefault("_flex_masks", {})  # frozen dataclass: no setattr
    key = (layout, n_q, n_k, str(device))  # DocCausal hashes by identity
    if key not in cache:

        def mask_mod(b, h, q_idx, kv_idx):
            return layout_allows(layout, q_idx, kv_idx, b)

        cache[key] = _flex_import().create_block_mask(
            mask_mod, batch, None, n_q, n_k, device=device, _compile=device.type == "cuda"
        )
    return cache[key]


def _block_mask(layout: Layout, n_q: int, n_k: int, device: torch.device):
    layout = tuple((relative_rule(rule), off, n) for rule, off, n in layout)
    key = (layout, n_q, n_k, str(device))
    if key in _BLOCK_MASKS:
        _BLOCK_MASKS.move_to_end(key)
        return _BLOCK_MASKS[key]

    def mask_mod(b, h, q_idx, kv_idx):
        return layout_allows(layout, q_idx, kv_idx)

    # Compiled mask creation avoids materialising [T, S] on CUDA (pytorch #134756).
    mask = _flex_import().create_block_mask(
        mask_mod, None, None, n_q, n_k, device=device, _compile=device.type == "cuda"
    )
    _BLOCK_MASKS[key] = mask
    if len(_BLOCK_MASKS) > _MAX_BLOCK_MASKS:
        _BLOCK_MASKS.popitem(last=False)
    return mask


def flex_attend(
    q: Tensor,
    groups: list[KeyGroup],
    q_nope: Tensor | None,
    layout: Layout,
    compile_backend: str | Callable | None = None,
) -> Tensor:
    """Attention over all groups in one flex_attention call (rows with no key give zeros).

    compile_backend: None compiles with inductor on CUDA and runs eagerly elsewhere; a dynamo
    backend (e.g. "eager", or a counting one in tests) compiles with it on any device.
    """
    qq, kk, vv = concat_groups(q, groups, q_nope)
    if per_row(layout):
        mask = _doc_block_mask(layout, q.shape[0], qq.shape[-2], kk.shape[-2], q.device)
    else:
        mask = _block_mask(layout, qq.shape[-2], kk.shape[-2], q.device)
    if compile_backend is not None:
        fn = _compiled_flex(compile_backend)
    else:
        fn = _compiled_flex() if q.is_cuda else _flex_import().flex_attention
    return fn(qq, kk, vv, block_mask=mask, scale=q.shape[-1] ** -0.5)
