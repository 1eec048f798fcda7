"""An independent fp64 model of flash-attn 2's calling contract (v2.6.0 - v2.8.3), for CPU tests.

It re-implements what our adapter (``models/attention/flash.py``) and any caller of the public
``flash_attn_func`` rely on, written from flash-attn's own sources, never from this project's
mask or band kernels (so a shared misunderstanding shows up as a test failure). Sources, all in
Dao-AILab/flash-attention:

- ``flash_attn/flash_attn_interface.py``: ``flash_attn_func`` pads the head dim to a multiple
  of 8 and its backward ignores the lse gradient. The private ``_flash_attn_forward`` /
  ``_flash_attn_backward`` take ``window_size=(left, right)`` before 2.6.3 (forward returns
  (out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state), backward (dq, dk, dv, softmax_d));
  from 2.6.3 they are torch custom ops taking ``window_size_left``/``window_size_right``
  (forward returns (out_padded, softmax_lse, S_dmask, rng_state), backward softmax_d). Both
  write dq, dk, dv into the buffers passed in. (The 2.6.3 split is also how ring-flash-attention
  dispatches on ``flash_attn.__version__``.)
- ``csrc/flash_attn/flash_api.cpp`` (mha_fwd/mha_bwd, set_params_fprop): fp16/bf16 only, k and v
  of q's dtype, last dim contiguous, head dim <= 256 and a multiple of 8, heads of q a multiple
  of heads of k; ``left >= seqlen_k`` -> -1, ``right >= seqlen_k`` -> -1; seqlen_q == 1 turns
  causal off; causal sets right = 0; then a one-sided window gets seqlen_k on its open side.
  softmax_lse is fp32 [B, H, seqlen_q]; seqlen_k == 0 gives out 0 and lse +inf.
- ``csrc/flash_attn/src/mask.h``: key j is visible to query i iff
  ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right`` (bottom-right
  aligned; no bound on a side whose window is negative).
- the varlen API (``_flash_attn_varlen_forward/backward``, ``mha_varlen_fwd``): modelled in
  ``flash_contract_varlen.py``.
- ``csrc/flash_attn/src/softmax.h`` (normalize_softmax_lse) and ``flash_fwd_kernel.h`` (split-KV
  combine): a row with no visible key has out 0 and lse **+inf**; lse is the natural log.

``top_left=True`` is a deliberately wrong variant (masks aligned top-left), used by the
mutation self-test: the adapter checked against it must fail.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Iterator

import torch
from torch import Tensor

from titans_train.models.attention.flash import CONTRACT_MARK, reset_flash_import

from .flash_contract_core import (
    _check,
    _fail,
    _softmax_d,
    _unsupported,
    contract_backward,
    contract_forward,
    visible_keys,
)
from .flash_contract_varlen import private_varlen  # the varlen half of the contract

__all__ = ["CONTRACT_MARK", "flash_attn_module", "installed", "visible_keys"]

STYLES = {"2.6.0": "window_size", "2.8.3": "window_size_left"}


def _fwd(q, k, v, dropout_p, softmax_scale, causal, left, right, softcap, alibi, top_left):
    _unsupported(dropout_p, softcap, alibi)
    _check(q, k, v)
    return contract_forward(q, k, v, softmax_scale, left, right, causal, top_left)


def _bwd(dout, q, k, v, out, lse, dq, dk, dv, dropout_p, scale, causal, left, right, softcap,
         alibi, top_left):  # fmt: skip
    _unsupported(dropout_p, softcap, alibi)
    _check(q, k, v)
    if dout.stride(-1) != 1 or out.stride(-1) != 1:
        _fail("out and dout must have contiguous last dimension")
    grads = contract_backward(dout, q, k, v, out, lse, scale, left, right, causal, top_left)
    for buf, grad in zip((dq, dk, dv), grads):
        buf.copy_(grad)  # flash writes the gradients into the buffers it is given
    return _softmax_d(dout, out)


def _private_26(top_left: bool):
    """2.6.0-2.6.2: plain functions, window_size=(left, right), long return tuples."""

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                            alibi_slopes, return_softmax):  # fmt: skip
        out, lse = _fwd(q, k, v, dropout_p, softmax_scale, causal, *window_size, softcap,
                        alibi_slopes, top_left)  # fmt: skip
        return out, q, k, v, out, lse, None, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p,
                             softmax_scale, causal, window_size, softcap, alibi_slopes,
                             deterministic, rng_state=None):  # fmt: skip
        d = _bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                 *window_size, softcap, alibi_slopes, top_left)  # fmt: skip
        return dq, dk, dv, d

    return _flash_attn_forward, _flash_attn_backward


@functools.cache
def _private_28(top_left: bool):
    """2.6.3-2.8.3: torch custom ops with window_size_left/right (registered once per variant)."""
    tag = "top_left" if top_left else "bottom_right"

    @torch.library.custom_op(f"titans_flash_contract::fwd_{tag}", mutates_args=())
    def _flash_attn_forward(
        q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float, causal: bool,
        window_size_left: int, window_size_right: int, softcap: float,
        alibi_slopes: Tensor | None, return_softmax: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        out, lse = _fwd(q, k, v, dropout_p, softmax_scale, causal, window_size_left,
                        window_size_right, softcap, alibi_slopes, top_left)  # fmt: skip
        return out, lse, q.new_empty(0), torch.zeros(2, dtype=torch.int64)

    @torch.library.custom_op(f"titans_flash_contract::bwd_{tag}", mutates_args=("dq", "dk", "dv"))
    def _flash_attn_backward(
        dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
        dq: Tensor | None, dk: Tensor | None, dv: Tensor | None, dropout_p: float,
        softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
        softcap: float, alibi_slopes: Tensor | None, deterministic: bool,
        rng_state: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        if dq is None or dk is None or dv is None:
            raise NotImplementedError("the contract model needs the dq, dk, dv buffers")
        return _bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale,
                    causal, window_size_left, window_size_right, softcap, alibi_slopes,
                    top_left)  # fmt: skip

    return _flash_attn_forward, _flash_attn_backward


class _FlashFunc(torch.autograd.Function):
    """flash_attn_func's autograd: pads d to a multiple of 8; lse gets no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, window, top_left):
        d = q.shape[-1]
        pad = (0, -d % 8)
        qp, kp, vp = (torch.nn.functional.pad(x, pad) for x in (q, k, v))
        out, lse = contract_forward(qp, kp, vp, scale, *window, causal, top_left)
        ctx.save_for_backward(qp, kp, vp, out, lse)
        ctx.args = (scale, *window, causal, top_left, d)
        ctx.mark_non_differentiable(lse)
        return out[..., :d], lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # flash ignores the lse gradient
        qp, kp, vp, out, lse = ctx.saved_tensors
        scale, left, right, causal, top_left, d = ctx.args
        dout = torch.nn.functional.pad(dout, (0, -d % 8))
        grads = contract_backward(dout, qp, kp, vp, out, lse, scale, left, right, causal, top_left)
        return (*(g[..., :d].to(x.dtype) for g, x in zip(grads, (qp, kp, vp))), *[None] * 4)


def _public(top_left: bool):
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                        deterministic=False, return_attn_probs=False):  # fmt: skip
        _unsupported(dropout_p, softcap, alibi_slopes)
        _check(q, k, v, pad_ok=True)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        out, lse = _FlashFunc.apply(q, k, v, scale, causal, tuple(window_size), top_left)
        return (out, lse, q.new_empty(0)) if return_attn_probs else out

    return flash_attn_func


def flash_attn_module(version: str = "2.8.3", top_left: bool = False) -> types.ModuleType:
    """A stand-in ``flash_attn`` package (with its ``flash_attn_interface`` submodule).

    version: "2.6.0" (window_size tuple) or "2.8.3" (window_size_left/right custom ops).
    top_left: the mutated, wrongly aligned variant for mutation self-tests.
    """
    if version not in STYLES:
        raise ValueError(f"flash contract version must be one of {sorted(STYLES)}, got {version}")
    fwd, bwd = _private_26(top_left) if version == "2.6.0" else _private_28(top_left)
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_forward, iface._flash_attn_backward = fwd, bwd
    iface.flash_attn_func = _public(top_left)
    iface._flash_attn_varlen_forward, iface._flash_attn_varlen_backward = private_varlen(
        version, top_left
    )
    pkg = types.ModuleType("flash_attn")
    pkg.__version__, pkg.__path__ = version, []
    pkg.flash_attn_interface, pkg.flash_attn_func = iface, iface.flash_attn_func
    setattr(pkg, CONTRACT_MARK, {"version": version, "top_left": top_left})
    return pkg


@contextlib.contextmanager
def installed(module: types.ModuleType) -> Iterator[types.ModuleType]:
    """Put a (contract) flash_attn module into sys.modules and reset the adapter's import cache."""
    names = ("flash_attn", "flash_attn.flash_attn_interface")
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules["flash_attn"] = module
    sys.modules["flash_attn.flash_attn_interface"] = module.flash_attn_interface
    reset_flash_import()
    try:
        yield module
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
        reset_flash_import()
