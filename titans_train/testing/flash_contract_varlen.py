"""The varlen half of the flash-attn 2 contract model (v2.6.0 - v2.8.3), for CPU tests.

Written from Dao-AILab/flash-attention, not from this project's kernels:

- ``flash_attn/flash_attn_interface.py``: ``_flash_attn_varlen_forward(q, k, v, cu_seqlens_q,
  cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window...,
  softcap, alibi_slopes, return_softmax, block_table, leftpad_k, seqused_k)`` with
  ``window_size=(l, r)`` before 2.6.3 (returns the 8-tuple, lse at index 5) and
  ``window_size_left/right`` custom ops from 2.6.3 (returns (out, lse, S_dmask, rng_state));
  ``_flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
  cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window...,
  softcap, alibi_slopes, deterministic, rng_state)`` writes dq, dk, dv into the given buffers.
- ``csrc/flash_attn/flash_api.cpp`` (mha_varlen_fwd): q [total_q, H, d], k/v [total_k, Hk, d];
  cu_seqlens int32, contiguous, [batch + 1], on q's device (CHECK_DEVICE); ``max_seqlen_q == 1``
  turns causal off; causal sets right = 0; the window is normalised with **max_seqlen_k** (not
  each sequence's length); softmax_lse is fp32 **[H, total_q]** (unpadded, since PR #970, before
  2.6.0); max_seqlen_k == 0 gives out 0, lse +inf.
- ``csrc/flash_attn/src/mask.h`` with ``block_info.h``: the mask of each sequence uses its own
  lengths from cu_seqlens, so keys are **bottom-right aligned per sequence**.

flash-attn does not validate cu_seqlens beyond dtype/shape/device: a cu_seqlens that does not
run from 0 to total, or a sequence longer than max_seqlen, reads out of bounds or leaves rows
unset. The model raises instead, so such a call fails loudly in the CPU tests.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .flash_contract_core import (
    _check,
    _fail,
    _unsupported,
    forward_normalised,
    grads_normalised,
    normalize_window,
)


def _lengths(name: str, cu: Tensor, total: int, max_len: int, q: Tensor) -> list[tuple[int, int]]:
    if cu.dtype != torch.int32:
        _fail(f"{name} must have dtype int32")
    if cu.device != q.device:
        _fail(f"{name} must be on q's device ({q.device}), got {cu.device}")
    if cu.dim() != 1 or not cu.is_contiguous():
        _fail(f"{name} must be a contiguous 1-D tensor")
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        _fail(f"{name} must rise from 0 to {total} (the packed length), got {bounds}")
    spans = list(zip(bounds[:-1], bounds[1:]))
    longest = max((b - a for a, b in spans), default=0)
    if longest > max_len:
        _fail(f"{name} has a sequence of {longest} but max_seqlen is {max_len}")
    return spans


def _check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, extras=()) -> list:
    if any(x is not None for x in extras):
        raise NotImplementedError("the contract model has no block_table, leftpad_k, seqused_k")
    if q.dim() != 3 or k.dim() != 3:
        _fail("varlen q, k, v must be [total, heads, head_dim]")
    _check(q[None], k[None], v[None])
    if cu_q.numel() != cu_k.numel():
        _fail("cu_seqlens_k must have shape [batch_size + 1]")
    if cu_q.numel() < 2:
        _fail("batch size must be positive")
    qs = _lengths("cu_seqlens_q", cu_q, q.shape[0], max_q, q)
    ks = _lengths("cu_seqlens_k", cu_k, k.shape[0], max_k, q)
    return list(zip(qs, ks))


def contract_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, causal,
                            top_left=False, extras=()):  # fmt: skip
    """(out [total_q, H, d] in q's dtype, lse fp32 [H, total_q]); window not normalised."""
    spans = _check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, extras)
    left, right = normalize_window(left, right, causal, max_q, max_k)
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), device=q.device)
    for (a, b), (c, d) in spans:
        if b > a and d > c:  # an empty key sequence leaves out 0, lse +inf
            o, l = forward_normalised(q[None, a:b], k[None, c:d], v[None, c:d], scale, left,
                                      right, top_left)  # fmt: skip
            out[a:b], lse[:, a:b] = o[0], l[0]
    return out, lse


def contract_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k,
                             scale, left, right, causal, top_left=False):  # fmt: skip
    """Writes dq, dk, dv (flash does) and returns softmax_d [H, total_q + 128 * batch]."""
    spans = _check_varlen(q, k, v, cu_q, cu_k, max_q, max_k)
    if lse.shape != (q.shape[1], q.shape[0]) or lse.dtype != torch.float32:
        _fail("softmax_lse must be float32 [heads, total_q]")
    if dout.stride(-1) != 1 or out.stride(-1) != 1:
        _fail("out and dout must have contiguous last dimension")
    left, right = normalize_window(left, right, causal, max_q, max_k)
    for buf in (dq, dk, dv):
        buf.zero_()
    for (a, b), (c, d) in spans:
        if b > a and d > c:
            one = [x[None, a:b] for x in (dout, q)] + [x[None, c:d] for x in (k, v)]
            grads = grads_normalised(*one, out[None, a:b], lse[None, :, a:b], scale, left, right,
                                     top_left)  # fmt: skip
            for buf, g, (lo, hi) in zip((dq, dk, dv), grads, ((a, b), (c, d), (c, d))):
                buf[lo:hi] += g[0].to(buf.dtype)
    soft_d = torch.zeros(q.shape[1], q.shape[0] + 128 * len(spans), device=q.device)
    soft_d[:, : q.shape[0]] = torch.einsum("ihd,ihd->hi", dout.double(), out.double()).float()
    return soft_d


def _private_varlen_26(top_left: bool):
    """2.6.0-2.6.2: plain functions with window_size=(left, right)."""

    def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, dropout_p, softmax_scale, causal,
                                   window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                   return_softmax=False, block_table=None, leftpad_k=None,
                                   seqused_k=None):  # fmt: skip
        _unsupported(dropout_p, softcap, alibi_slopes)
        out, lse = contract_varlen_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
            *window_size, causal, top_left, (block_table, leftpad_k, seqused_k),
        )  # fmt: skip
        return out, q, k, v, out, lse, None, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                                    cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                    softmax_scale, causal, window_size, softcap, alibi_slopes,
                                    deterministic, rng_state=None):  # fmt: skip
        _unsupported(dropout_p, softcap, alibi_slopes)
        d = contract_varlen_backward(
            dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, softmax_scale, *window_size, causal, top_left,
        )  # fmt: skip
        return dq, dk, dv, d

    return _flash_attn_varlen_forward, _flash_attn_varlen_backward


@functools.cache
def _private_varlen_28(top_left: bool):
    """2.6.3-2.8.3: torch custom ops with window_size_left/right (registered once)."""
    tag = "top_left" if top_left else "bottom_right"

    @torch.library.custom_op(f"titans_flash_contract::varlen_fwd_{tag}", mutates_args=())
    def _flash_attn_varlen_forward(
        q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
        max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float,
        causal: bool, window_size_left: int = -1, window_size_right: int = -1,
        softcap: float = 0.0, alibi_slopes: Tensor | None = None, return_softmax: bool = False,
        block_table: Tensor | None = None, leftpad_k: Tensor | None = None,
        seqused_k: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        _unsupported(dropout_p, softcap, alibi_slopes)
        out, lse = contract_varlen_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
            window_size_left, window_size_right, causal, top_left,
            (block_table, leftpad_k, seqused_k),
        )  # fmt: skip
        return out, lse, q.new_empty(0), torch.zeros(2, dtype=torch.int64)

    @torch.library.custom_op(
        f"titans_flash_contract::varlen_bwd_{tag}", mutates_args=("dq", "dk", "dv")
    )
    def _flash_attn_varlen_backward(
        dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
        dq: Tensor | None, dk: Tensor | None, dv: Tensor | None, cu_seqlens_q: Tensor,
        cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
        softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
        softcap: float, alibi_slopes: Tensor | None, deterministic: bool,
        rng_state: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        _unsupported(dropout_p, softcap, alibi_slopes)
        if dq is None or dk is None or dv is None:
            raise NotImplementedError("the contract model needs the dq, dk, dv buffers")
        return contract_varlen_backward(
            dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, softmax_scale, window_size_left, window_size_right,
            causal, top_left,
        )  # fmt: skip

    return _flash_attn_varlen_forward, _flash_attn_varlen_backward


def private_varlen(version: str, top_left: bool = False):
    """(_flash_attn_varlen_forward, _flash_attn_varlen_backward) of one signature style."""
    return _private_varlen_26(top_left) if version == "2.6.0" else _private_varlen_28(top_left)
