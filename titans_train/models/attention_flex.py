"""flex_attention backend: one kernel call over all groups, masked by a ``mask_mod``.

The groups are concatenated exactly as for SDPA (``concat_groups``) and the rules become a
``mask_mod`` over the concatenated key axis. On CUDA flex must run compiled (eager flex is an
unfused O(T*S) reference), so we keep one module-level compiled function and cache block masks
by (layout, shape, device). On CPU flex has no backward ("FlexAttention does not support
backward on CPU"), so it is forward-only there and runs eagerly (tests use it for parity).
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch import Tensor

from titans_train.models.attention_rules import KeyGroup, Layout, concat_groups, layout_allows

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
def _compiled_flex():
    # One compiled callable for the process; dynamo specialises it per shape as needed.
    return torch.compile(_flex_import().flex_attention, dynamic=False)


def flex_unusable_reason(q: Tensor, needs_grad: bool) -> str | None:
    """Why flex_attention cannot run here, or None if it can."""
    imported = _flex_import()
    if isinstance(imported, str):
        return imported
    if needs_grad and not q.is_cuda:
        return (
            f"flex_attention is forward-only on {q.device.type} (FlexAttention does not support "
            "backward on CPU); use backend='sdpa' for training on CPU"
        )
    return None


def _block_mask(layout: Layout, n_q: int, n_k: int, device: torch.device):
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


def flex_attend(q: Tensor, groups: list[KeyGroup], q_nope: Tensor | None, layout: Layout) -> Tensor:
    """Attention over all groups in one flex_attention call (rows with no key give zeros)."""
    qq, kk, vv = concat_groups(q, groups, q_nope)
    mask = _block_mask(layout, qq.shape[-2], kk.shape[-2], q.device)
    fn = _compiled_flex() if q.is_cuda else _flex_import().flex_attention
    return fn(qq, kk, vv, block_mask=mask, scale=q.shape[-1] ** -0.5)
