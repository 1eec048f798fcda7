"""flash-attn band kernel: the thin adapter between ``attention_merge`` and flash-attn 2.x.

Everything above the kernel call (rule -> pieces, LSE merge, custom backward) lives in
``attention_merge`` and is tested on CPU through its math twin. This file only converts layouts
and calls flash-attn's low-level ``_flash_attn_forward`` / ``_flash_attn_backward``, which
return and consume softmax_lse (the public ``flash_attn_func`` cannot take a global out/lse).

Signatures differ across releases (checked against the flash-attn sources):
- 2.6.x: ``window_size=(left, right)``; forward returns
  (out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state); backward returns (dq, dk, dv, d).
- 2.7+ (through 2.8): ``window_size_left=, window_size_right=``; both are torch custom ops;
  forward returns (out_padded, softmax_lse, S_dmask, rng_state); backward returns softmax_d.
In every version the backward writes dq, dk, dv into the buffers we pass. We detect the
variant from the parameter names and pass only the keywords the installed version knows.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from titans_train.models.attention_merge import BandKernel, BlockPrimitive, piecewise_primitive


def _params(fn: Callable) -> set[str]:
    # torch custom ops (flash-attn >= 2.7) hide the real signature behind CustomOpDef._init_fn.
    return set(inspect.signature(getattr(fn, "_init_fn", fn)).parameters)


def make_flash_kernel(fwd: Callable, bwd: Callable) -> BandKernel:
    """Band kernel from flash-attn's private forward/backward (any 2.6-2.8 signature)."""
    fwd_params, bwd_params = _params(fwd), _params(bwd)
    split_window = "window_size_left" in fwd_params
    lse_index = 1 if split_window else 5  # see module docstring

    def window(left: int, right: int) -> dict:
        if split_window:
            return {"window_size_left": left, "window_size_right": right}
        return {"window_size": (left, right)}

    def known(kwargs: dict, params: set[str]) -> dict:
        return {k: val for k, val in kwargs.items() if k in params}

    def forward(q, k, v, left, right, scale):
        qf, kf, vf = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # flash: [B, T, H, d]
        kwargs = dict(
            dropout_p=0.0, softmax_scale=scale, causal=False, softcap=0.0,
            alibi_slopes=None, return_softmax=False, **window(left, right),
        )  # fmt: skip
        res = fwd(qf, kf, vf, **known(kwargs, fwd_params))
        out, lse = res[0], res[lse_index]
        # flash marks rows with no key by lse = +inf; the protocol wants -inf (log of 0).
        # (plan_pieces never yields such rows; this keeps the kernel usable on its own.)
        lse = lse[..., : q.shape[-2]]  # float32 from flash
        return out.transpose(1, 2), torch.where(torch.isinf(lse), float("-inf"), lse)

    def backward(dout, q, k, v, out, lse, left, right, scale):
        qf, kf, vf, of, gf = (x.transpose(1, 2).contiguous() for x in (q, k, v, out, dout))
        dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
        kwargs = dict(
            dropout_p=0.0, softmax_scale=scale, causal=False, softcap=0.0, alibi_slopes=None,
            deterministic=False, rng_state=None, **window(left, right),
        )  # fmt: skip
        bwd(gf, qf, kf, vf, of, lse.contiguous(), dq, dk, dv, **known(kwargs, bwd_params))
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    return BandKernel(forward, backward)


@functools.cache
def _flash_import() -> tuple[Callable, Callable] | str:
    """(forward, backward) from flash-attn, or the import error as a string."""
    try:
        from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward
    except Exception as e:  # ImportError, or a CUDA/ABI error from the compiled extension
        return f"flash_attn does not import ({type(e).__name__}: {e})"
    return _flash_attn_forward, _flash_attn_backward


def flash_unusable_reason(q: Tensor) -> str | None:
    """Why flash-attn cannot run for this query tensor, or None if it can."""
    if not q.is_cuda:
        return f"tensors are on {q.device.type}; flash-attn needs CUDA"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype is {q.dtype}; flash-attn needs float16 or bfloat16"
    d = q.shape[-1]
    if d % 8 != 0 or d > 256:
        return f"head dim is {d}; flash-attn needs a multiple of 8 and at most 256"
    imported = _flash_import()
    return imported if isinstance(imported, str) else None


@functools.cache
def flash_primitive() -> BlockPrimitive:
    """The flash-attn block primitive (CUDA only; call after flash_unusable_reason is None)."""
    imported = _flash_import()
    if isinstance(imported, str):
        raise RuntimeError(imported)
    return piecewise_primitive(make_flash_kernel(*imported))
