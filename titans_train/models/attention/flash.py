"""flash-attn band kernel: the thin adapter between ``merge`` and flash-attn 2.x.

Everything above the kernel call (rule -> pieces, LSE merge, custom backward) lives in
``merge`` and is tested on CPU through its math twin. This file only converts layouts
and calls flash-attn's low-level ``_flash_attn_forward`` / ``_flash_attn_backward``, which
return and consume softmax_lse (the public ``flash_attn_func`` cannot take a global out/lse).

Signatures differ across releases (checked against flash_attn/flash_attn_interface.py):
- 2.6.0-2.6.2: ``window_size=(left, right)``; forward returns
  (out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state); backward returns (dq, dk, dv, d).
- 2.6.3-2.8.3: ``window_size_left=, window_size_right=``; both are torch custom ops;
  forward returns (out_padded, softmax_lse, S_dmask, rng_state); backward returns softmax_d.
In every version the backward writes dq, dk, dv into the buffers we pass. We detect the
variant from the parameter names and pass only the keywords the installed version knows.

FA3 (the Hopper ``flash_attn_interface`` top-level module, ops ``flash_attn_3::``) is NOT used:
its private functions take no dropout_p and put cu_seqlens/max_seqlen where FA2 has dq, dk, dv
(hopper/flash_attn_interface.py), so passing FA2 arguments to it would be a mis-call. We import
only ``flash_attn.flash_attn_interface`` and refuse any signature without FA2's parameters.

Backward determinism: flash's backward accumulates dq with atomic adds, so it is not bitwise
reproducible unless ``deterministic=True``. We pass
``deterministic=torch.are_deterministic_algorithms_enabled()``, so
``torch.use_deterministic_algorithms(True)`` selects flash's deterministic backward.

Testing seam: on CPU, ``flash_unusable_reason`` refuses non-CUDA tensors, except when the
installed ``flash_attn`` is the contract model (``titans_train.testing.flash_contract``, marked
by its ``CONTRACT_MARK`` attribute), which runs on any device.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .documents import VarlenKernel, with_documents
from .merge import BandKernel, BlockPrimitive, piecewise_primitive


def _params_ordered(fn: Callable) -> list[str]:
    # torch custom ops (flash-attn >= 2.6.3) hide the real signature behind CustomOpDef._init_fn.
    return list(inspect.signature(getattr(fn, "_init_fn", fn)).parameters)


def _params(fn: Callable) -> set[str]:
    return set(_params_ordered(fn))


log = logging.getLogger(__name__)
CONTRACT_MARK = "__titans_flash_contract__"  # set on titans_train.testing's fake flash_attn
_FA2_FWD = {"q", "k", "v", "dropout_p", "softmax_scale", "causal", "softcap", "alibi_slopes"}
_FA2_BWD = {"dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p"}
_VARLEN = {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"}


def signature_style(fwd: Callable, bwd: Callable) -> str | None:
    """Which FA2 private signature these are ("window_size" = 2.6.0-2.6.2, "window_size_left"
    = 2.6.3-2.8.3), or None for anything else (FA3, or a future change): never called then."""
    fwd_params, bwd_params = _params(fwd), _params(bwd)
    if not (fwd_params >= _FA2_FWD and bwd_params >= _FA2_BWD):
        return None
    if _params_ordered(bwd)[6:9] != ["dq", "dk", "dv"]:  # we pass them positionally
        return None
    for style in ("window_size_left", "window_size"):
        if style in fwd_params and style in bwd_params:
            return style
    return None


def _window_kwargs(style: str) -> Callable[[int, int], dict]:
    def window(left: int, right: int) -> dict:
        if style == "window_size_left":
            return {"window_size_left": left, "window_size_right": right}
        return {"window_size": (left, right)}

    return window


def make_flash_varlen_kernel(fwd: Callable, bwd: Callable) -> VarlenKernel:
    """Varlen kernel from flash-attn's private _flash_attn_varlen_forward/backward (2.6-2.8).

    One call covers many sequences (cu_seqlens, int32 on q's device); each sequence's keys are
    bottom-right aligned to its queries; one window for all; lse is [H, total_q] fp32."""
    fwd_params, bwd_params = _params(fwd), _params(bwd)
    style = signature_style(fwd, bwd)
    if style is None or not (fwd_params >= _VARLEN and bwd_params >= _VARLEN):
        raise ValueError(
            f"flash-attn varlen functions have an unknown signature: {sorted(fwd_params)}"
        )
    window, lse_index = _window_kwargs(style), 1 if style == "window_size_left" else 5

    def known(kwargs: dict, params: set[str]) -> dict:
        return {k: val for k, val in kwargs.items() if k in params}

    def lengths(cu_q, cu_k, max_q, max_k) -> dict:
        return dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, left, right, scale):
        kwargs = dict(
            **lengths(cu_q, cu_k, max_q, max_k), dropout_p=0.0, softmax_scale=scale,
            causal=False, softcap=0.0, alibi_slopes=None, return_softmax=False,
            **window(left, right),
        )  # fmt: skip
        res = fwd(q.contiguous(), k.contiguous(), v.contiguous(), **known(kwargs, fwd_params))
        out, lse = res[0], res[lse_index]  # lse [H, total_q] fp32; +inf on rows with no key
        return out, torch.where(torch.isinf(lse), float("-inf"), lse)

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, left, right, scale):
        q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kwargs = dict(
            **lengths(cu_q, cu_k, max_q, max_k), dropout_p=0.0, softmax_scale=scale,
            causal=False, softcap=0.0, alibi_slopes=None, rng_state=None,
            deterministic=torch.are_deterministic_algorithms_enabled(), **window(left, right),
        )  # fmt: skip
        bwd(dout, q, k, v, out, lse.contiguous(), dq, dk, dv, **known(kwargs, bwd_params))
        return dq, dk, dv

    return VarlenKernel(forward, backward)


def make_flash_kernel(fwd: Callable, bwd: Callable) -> BandKernel:
    """Band kernel from flash-attn's private forward/backward (any 2.6-2.8 signature)."""
    fwd_params, bwd_params = _params(fwd), _params(bwd)
    style = signature_style(fwd, bwd)
    if style is None:
        raise ValueError(
            "flash-attn private functions have an unknown signature (FA3's flash_attn_interface "
            f"is not supported; FA2 2.6-2.8 is): {sorted(fwd_params)}"
        )
    split_window = style == "window_size_left"
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
            deterministic=torch.are_deterministic_algorithms_enabled(), rng_state=None,
            **window(left, right),
        )  # fmt: skip
        bwd(gf, qf, kf, vf, of, lse.contiguous(), dq, dk, dv, **known(kwargs, bwd_params))
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    return BandKernel(forward, backward)


class FlashAPI(NamedTuple):
    forward: Callable
    backward: Callable
    varlen_forward: Callable
    varlen_backward: Callable
    version: str
    style: str  # "window_size" (2.6.0-2.6.2) or "window_size_left" (2.6.3-2.8.3)
    contract: bool  # the CPU contract model from titans_train.testing, not the CUDA library


@functools.cache
def _flash_import() -> FlashAPI | str:
    """flash-attn's private API, or why it cannot be used (logged once per process)."""
    try:
        import flash_attn
        from flash_attn.flash_attn_interface import (
            _flash_attn_backward,
            _flash_attn_forward,
            _flash_attn_varlen_backward,
            _flash_attn_varlen_forward,
        )
    except Exception as e:  # ImportError, or a CUDA/ABI error from the compiled extension
        reason = f"flash_attn does not import ({type(e).__name__}: {e})"
        if not isinstance(e, ModuleNotFoundError) or e.name != "flash_attn":
            log.warning("flash-attn refused: %s", reason)  # installed but broken: say so
        return reason
    version = str(getattr(flash_attn, "__version__", "unknown"))
    style = signature_style(_flash_attn_forward, _flash_attn_backward)
    varlen = (_flash_attn_varlen_forward, _flash_attn_varlen_backward)
    if style is None or signature_style(*varlen) != style or not _params(varlen[0]) >= _VARLEN:
        reason = (
            f"flash_attn {version}: unknown _flash_attn_[varlen_]forward/backward signature "
            "(FA2 2.6-2.8 supported; FA3 is not used)"
        )
        log.warning("flash-attn refused: %s", reason)
        return reason
    contract = hasattr(flash_attn, CONTRACT_MARK)
    return FlashAPI(_flash_attn_forward, _flash_attn_backward, *varlen, version, style, contract)


def reset_flash_import() -> None:
    """Forget the cached import (tests and the GPU smoke check swap flash_attn modules)."""
    _flash_import.cache_clear()
    flash_primitive.cache_clear()


def flash_api() -> FlashAPI | str:
    """The imported flash-attn API, or the reason it is unavailable."""
    return _flash_import()


def flash_unusable_reason_for(
    device: torch.device, dtype: torch.dtype, head_dim: int | None = None
) -> str | None:
    """Why flash-attn cannot run for this device/dtype/head dim, or None if it can."""
    imported = _flash_import()
    contract = not isinstance(imported, str) and imported.contract
    if device.type != "cuda" and not contract:
        return f"tensors are on {device.type}; flash-attn needs CUDA"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype is {dtype}; flash-attn needs float16 or bfloat16"
    if head_dim is not None and (head_dim % 8 != 0 or head_dim > 256):
        return f"head dim is {head_dim}; flash-attn needs a multiple of 8 and at most 256"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # flash_api.cpp: "FlashAttention only supports Ampere GPUs or newer."
            return f"GPU compute capability is sm{major}{minor}; flash-attn 2 needs sm80 or newer"
    return imported if isinstance(imported, str) else None


def flash_unusable_reason(q: Tensor) -> str | None:
    """Why flash-attn cannot run for this query tensor, or None if it can."""
    return flash_unusable_reason_for(q.device, q.dtype, q.shape[-1])


@functools.cache
def flash_primitive() -> BlockPrimitive:
    """The flash-attn block primitive (call after flash_unusable_reason is None)."""
    imported = _flash_import()
    if isinstance(imported, str):
        raise RuntimeError(imported)
    bands = piecewise_primitive(make_flash_kernel(imported.forward, imported.backward))
    varlen = make_flash_varlen_kernel(imported.varlen_forward, imported.varlen_backward)
    return with_documents(bands, varlen)  # DocCausal groups go through flash varlen
