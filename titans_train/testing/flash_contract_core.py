"""The core of the flash-attn contract model (see ``flash_contract.py`` for the sources it
follows): input checks, the bottom-right window rule, and the fp64 forward / backward that both
the fixed-length and the varlen halves of the contract use."""

from __future__ import annotations

import torch
from torch import Tensor


def _fail(msg: str) -> None:
    raise RuntimeError(msg)  # flash-attn's TORCH_CHECK raises RuntimeError with these texts


def _check(q: Tensor, k: Tensor, v: Tensor, pad_ok: bool = False) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        _fail("FlashAttention only support fp16 and bf16 data type")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail("query and key must have the same dtype")
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        _fail("Input tensor must have contiguous last dimension")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        _fail("q, k, v must be [batch, seqlen, heads, head_dim]")
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[-1] != d or h % k.shape[2] != 0:
        _fail("Number of heads in key/value must divide number of heads in query")
    if d > 256:
        _fail("FlashAttention forward only supports head dimension at most 256")
    if d % 8 != 0 and not pad_ok:
        _fail("query, key, value, and out_ must have a head_size that is a multiple of 8")


def _unsupported(dropout_p: float, softcap: float, alibi_slopes: Tensor | None) -> None:
    if dropout_p != 0.0 or softcap != 0.0 or alibi_slopes is not None:
        raise NotImplementedError("the contract model covers dropout_p=0, softcap=0, no alibi")


def normalize_window(left: int, right: int, causal: bool, n_q: int, n_k: int) -> tuple[int, int]:
    """flash_api.cpp mha_fwd + set_params_fprop: the window the kernel actually applies."""
    if left >= n_k:
        left = -1
    if right >= n_k:
        right = -1
    if n_q == 1:
        causal = False  # "causal=true is the same as causal=false in this case"
    if causal:
        right = 0
    if left < 0 and right >= 0:
        left = n_k
    if left >= 0 and right < 0:
        right = n_k
    return left, right


def visible_keys(n_q: int, n_k: int, left: int, right: int, top_left: bool = False) -> Tensor:
    """[n_q, n_k] bool, mask.h's rule for an already normalised window (-1: no bound)."""
    i = torch.arange(n_q)[:, None] + (0 if top_left else n_k - n_q)  # aligned query position
    j = torch.arange(n_k)[None, :]
    ok = torch.ones(n_q, n_k, dtype=torch.bool)
    if left >= 0:
        ok = ok & (j >= i - left)
    if right >= 0:
        ok = ok & (j <= i + right)
    return ok


def _heads(x: Tensor, h: int) -> Tensor:
    return x.repeat_interleave(h // x.shape[2], dim=2)  # GQA: query head i uses kv head i // g


def _scores(q: Tensor, k: Tensor, scale: float, left: int, right: int, top_left: bool) -> Tensor:
    """fp64 scaled scores [B, H, Tq, Tk], -inf where mask.h hides the key."""
    s = torch.einsum("bihd,bjhd->bhij", q.double(), _heads(k, q.shape[2]).double()) * scale
    ok = visible_keys(q.shape[1], k.shape[1], left, right, top_left).to(q.device)
    return s.masked_fill(~ok, float("-inf"))


def contract_forward(q, k, v, scale, left, right, causal, top_left=False):
    """(out in q's dtype, lse fp32 [B, H, Tq]) for [B, T, H, d] inputs, window not normalised."""
    left, right = normalize_window(left, right, causal, q.shape[1], k.shape[1])
    return forward_normalised(q, k, v, scale, left, right, top_left)


def forward_normalised(q, k, v, scale, left, right, top_left=False):
    """contract_forward for a window already normalised (varlen normalises with max_seqlen)."""
    s = _scores(q, k, scale, left, right, top_left)
    lse = torch.logsumexp(s, dim=-1)
    lse = torch.where(torch.isneginf(lse), float("inf"), lse)  # empty row: +inf (softmax.h)
    p = torch.exp(s - lse[..., None])  # 0 on hidden keys and on empty rows, so out = 0 there
    out = torch.einsum("bhij,bjhd->bihd", p, _heads(v, q.shape[2]).double())
    return out.to(q.dtype), lse.float()


def contract_backward(dout, q, k, v, out, lse, scale, left, right, causal, top_left=False):
    """(dq, dk, dv) in fp64 from the saved out and lse, as mha_bwd computes them."""
    left, right = normalize_window(left, right, causal, q.shape[1], k.shape[1])
    if lse.shape != (q.shape[0], q.shape[2], q.shape[1]) or lse.dtype != torch.float32:
        _fail("softmax_lse must be float32 [batch, heads, seqlen_q]")
    return grads_normalised(dout, q, k, v, out, lse, scale, left, right, top_left)


def grads_normalised(dout, q, k, v, out, lse, scale, left, right, top_left=False):
    """contract_backward's maths for a window already normalised."""
    h, g = q.shape[2], q.shape[2] // k.shape[2]
    p = torch.exp(_scores(q, k, scale, left, right, top_left) - lse.double()[..., None])
    do, o = dout.double(), out.double()
    d = torch.einsum("bihd,bihd->bhi", do, o)  # softmax_d = rowsum(dout * out)
    dv = torch.einsum("bhij,bihd->bjhd", p, do)
    dp = torch.einsum("bihd,bjhd->bhij", do, _heads(v, h).double())
    ds = p * (dp - d[..., None])
    dq = torch.einsum("bhij,bjhd->bihd", ds, _heads(k, h).double()) * scale
    dk = torch.einsum("bhij,bihd->bjhd", ds, q.double()) * scale
    fold = (k.shape[0], k.shape[1], k.shape[2], g, k.shape[3])
    return dq, dk.reshape(fold).sum(3), dv.reshape(fold).sum(3)


def _softmax_d(dout: Tensor, out: Tensor) -> Tensor:
    b, t, h, _ = out.shape
    d = torch.zeros(b, h, -(-t // 128) * 128, dtype=torch.float32, device=out.device)
    d[..., :t] = torch.einsum("bihd,bihd->bhi", dout.double(), out.double()).float()
    return d
