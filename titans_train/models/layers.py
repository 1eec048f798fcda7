"""The Llama-style pieces every block shares: RoPE, SwiGLU, and self-attention with its KV cache."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import Causal, DocCausal, KeyGroup, Visible, attend
from .policy import residual_proj

KV = tuple[Tensor, Tensor]  # keys, values: [B, H, S, d]
Docs = tuple[Tensor, Tensor]  # documents and positions of tokens or keys: [B, S] int64 each


def rope_angles(pos0: int, n: int, head_dim: int, theta: float, device) -> tuple[Tensor, Tensor]:
    """cos/sin for absolute positions pos0 .. pos0+n-1, shape [n, head_dim/2] (float32)."""
    inv = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    pos = torch.arange(pos0, pos0 + n, device=device, dtype=torch.float64)
    ang = torch.outer(pos, inv)
    return ang.cos().float(), ang.sin().float()


def rope_angles_at(pos: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin for per-row positions pos [B, T] (integer), shape [B, 1, T, head_dim/2] (float32),
    for ``apply_rope`` on [B, H, T, d]. Packed documents restart positions at 0 per document.
    A row of consecutive positions p0.. gives exactly ``rope_angles(p0, T, ...)`` (same fp64
    product, then cast)."""
    if pos.dim() != 2 or pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise ValueError(f"rope_angles_at: pos must be an integer tensor [B, T], got {pos.dtype} "
                         f"{tuple(pos.shape)}")  # fmt: skip
    inv = theta ** (
        -torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float64) / head_dim
    )
    ang = pos.to(torch.float64)[:, None, :, None] * inv
    return ang.cos().float(), ang.sin().float()


_ANGLES: dict = {}


def cached_rope_angles(pos0: int, n: int, head_dim: int, theta: float, device):
    """``rope_angles``, kept for the few (pos0, n) a training run meets (MAC: one per segment;
    ~11 ops a call otherwise). A bounded cache: cleared when full (generation walks pos0)."""
    key = (pos0, n, head_dim, theta, str(device))
    if key not in _ANGLES:
        if len(_ANGLES) >= 256:
            _ANGLES.clear()
        with torch.inference_mode(False), torch.no_grad():
            angles = rope_angles(pos0, n, head_dim, theta, device)
        if any(type(t) is not torch.Tensor for t in angles):  # a mode's tensor subclass
            return angles
        _ANGLES[key] = angles
    return _ANGLES[key]


def _rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """out = x rotated by sign x the angles (``apply_rope``'s maths, 4 ops, no cat)."""
    h = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    return out


class _RopeHeads(torch.autograd.Function):
    """The attention's qkv [B, T, 3, H, d] -> (q rotated, q, k rotated, v), each [B, H, T, d]
    contiguous, or (k rotated, v) without ``need_q``; cos/sin broadcast to [B, T, H, d/2].
    One autograd node whose backward writes d qkv directly (the inverse rotation), instead of
    a split, transposes and RoPE's seven ops and their backward nodes (issue 16)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor, need_q: bool):
        ctx.save_for_backward(cos, sin)
        ctx.need_q = need_q
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work
        q, k, v = qkv.unbind(2)
        B, T, H, d = q.shape

        def new() -> Tensor:
            return qkv.new_empty(B, H, T, d)

        kr, vc = new(), new()
        _rotate_into(kr.transpose(1, 2), k, cos, sin, 1.0)
        vc.transpose(1, 2).copy_(v)
        if not need_q:
            return kr, vc
        qr, qc = new(), new()
        _rotate_into(qr.transpose(1, 2), q, cos, sin, 1.0)
        qc.transpose(1, 2).copy_(q)
        return qr, qc, kr, vc

    @staticmethod
    def backward(ctx, *grads):
        cos, sin = ctx.saved_tensors
        grads = grads if ctx.need_q else (None, None, *grads)
        dqr, dq, dkr, dv = (None if g is None else g.transpose(1, 2) for g in grads)
        ref = next(g for g in (dqr, dq, dkr, dv) if g is not None)
        B, T, H, d = ref.shape
        out = ref.new_empty(B, T, 3, H, d)
        gq, gk, gv = out.unbind(2)
        for o, rot, plain in ((gq, dqr, dq), (gk, dkr, None), (gv, None, dv)):
            if rot is not None:
                _rotate_into(o, rot, cos, sin, -1.0)
                if plain is not None:
                    o.add_(plain)
            elif plain is not None:
                o.copy_(plain)
            else:
                o.zero_()
        return out, None, None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [B, H, T, d] by half-split pairs (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    cos/sin: [T, d/2] (``rope_angles``) or [B, 1, T, d/2] (``rope_angles_at``)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def append_kv(cache: KV | None, k: Tensor, v: Tensor, keep: int | None) -> KV:
    """Keys/values seen so far plus the new ones, trimmed to the last ``keep`` (None = all)."""
    if cache is not None:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
    if keep is not None:
        k, v = k[:, :, max(0, k.shape[2] - keep) :], v[:, :, max(0, v.shape[2] - keep) :]
    return k, v


class _RMSNormFn(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w over the last dim: the forward of F.rms_norm's
    CPU composite op by op (bitwise equal), and a backward of 7 ops instead of autograd's ~18."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float) -> Tensor:
        r = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        xhat = x * r
        ctx.save_for_backward(xhat, r, w)
        return xhat * w

    @staticmethod
    def backward(ctx, g: Tensor):
        xhat, r, w = ctx.saved_tensors
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * xhat).sum(tuple(range(g.dim() - 1)))
        gx = g * w
        m = (gx * xhat).mean(-1, keepdim=True)
        return torch.addcmul(gx, xhat, m, value=-1.0).mul_(r), dw, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict) with one autograd node on CPU when input and
    weight are fp32 (or fp64) over the last dim (issue 16: ~25 ops a call became 13); otherwise
    (other devices, where F.rms_norm is fused, other dtypes, autocast) nn.RMSNorm's own path."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        full = w is not None and x.dtype == w.dtype and x.dtype in (torch.float32, torch.float64)
        plain = self.eps is not None and len(self.normalized_shape) == 1
        if full and plain and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            return _RMSNormFn.apply(x, w, self.eps)
        return super().forward(x)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = residual_proj(nn.Linear(hidden, dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class SelfAttention(nn.Module):
    """q/k/v projections and RoPE; the block decides which key groups a query sees.

    Returns merged heads [B, T, D] without an output projection: MAC and MAG fold it into their
    gate's W_o, the other blocks add their own.
    """

    def __init__(self, dim: int, heads: int, rope_theta: float, backend: str = "auto"):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.rope_theta, self.backend = rope_theta, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def _split(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def project(
        self, x: Tensor, pos0: int | Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(q rotated, q unrotated, k, v) for x: [B, T, D]; keys rotated unless pos0 is None.
        pos0: the first position (int), or every token's position ([B, T], documents)."""
        return self._project(x, pos0, True)

    def project_kv(self, x: Tensor, pos0: int | Tensor) -> tuple[Tensor, Tensor]:
        """(k rotated, v) of ``project``, without rotating the queries (MAC's memory reads)."""
        return self._project(x, pos0, False)

    def _project(self, x: Tensor, pos0: int | Tensor | None, need_q: bool) -> tuple:
        qkv = self.qkv(x)
        if pos0 is None:
            q, k, v = (self._split(t) for t in qkv.chunk(3, dim=-1))
            return (q, q, k, v) if need_q else (k, v)
        if isinstance(pos0, Tensor):  # [B, 1, T, d/2] -> [B, T, 1, d/2]
            cos, sin = (
                t.transpose(1, 2) for t in rope_angles_at(pos0, self.head_dim, self.rope_theta)
            )
        else:  # [T, d/2] -> [T, 1, d/2]
            angles = cached_rope_angles(pos0, x.shape[1], self.head_dim, self.rope_theta, x.device)
            cos, sin = (t.unsqueeze(-2) for t in angles)
        B, T, _ = x.shape
        heads = qkv.view(B, T, 3, self.heads, self.head_dim)
        return _RopeHeads.apply(heads, cos.to(qkv.dtype), sin.to(qkv.dtype), need_q)

    def prefix_group(self, tokens: Tensor, batch: int) -> KeyGroup:
        """Position-free keys (persistent tokens, MAC memory tokens), visible to every query."""
        _, _, k, v = self.project(tokens, None)
        return KeyGroup(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), Visible())

    def attend(self, q: Tensor, q_nope: Tensor, groups: list[KeyGroup]) -> Tensor:
        y = attend(q, groups, q_nope=q_nope, backend=self.backend)
        B, H, T, d = y.shape
        return y.transpose(1, 2).reshape(B, T, H * d)

    def sliding(
        self,
        x: Tensor,
        pos0: int,
        cache: KV | None,
        window: int | None,
        prefix: Tensor | None = None,
    ) -> tuple[Tensor, KV]:
        """Sliding-window (or full) causal attention with optional persistent prefix tokens.

        The cache keeps the last window-1 keys so a later call sees exactly what one call would.
        """
        q, q_nope, k, v = self.project(x, pos0)
        keys = append_kv(cache, k, v, None)
        groups = [] if prefix is None else [self.prefix_group(prefix, x.shape[0])]
        start = pos0 - (0 if cache is None else cache[0].shape[2])
        groups.append(KeyGroup(*keys, Causal(q_start=pos0, k_start=start, window=window)))
        y = self.attend(q, q_nope, groups)
        keep = None if window is None else window - 1
        return y, append_kv(None, *keys, keep)

    def sliding_documents(
        self,
        x: Tensor,
        docs: Docs,
        cache: KV | None,
        cache_docs: Docs | None,
        window: int | None,
        prefix: Tensor | None = None,
    ) -> tuple[Tensor, KV, Docs]:
        """``sliding`` over packed documents: ``docs`` gives each token's document (0 = the one
        the cache's document-0 keys belong to) and its position inside it, so no query sees a key
        of another document and RoPE restarts per document. Returns the output, the keys later
        calls still see, and their documents (0: the call's last document, -1: an earlier one)."""
        q_doc, q_pos = docs
        q, q_nope, k, v = self.project(x, q_pos)
        keys = append_kv(cache, k, v, None)
        k_doc, k_pos = q_doc, q_pos
        if cache is not None:
            k_doc = torch.cat([cache_docs[0], q_doc], 1)
            k_pos = torch.cat([cache_docs[1], q_pos], 1)
        groups = [] if prefix is None else [self.prefix_group(prefix, x.shape[0])]
        groups.append(KeyGroup(*keys, DocCausal(q_doc, q_pos, k_doc, k_pos, window=window)))
        y = self.attend(q, q_nope, groups)
        keep = keys[0].shape[2] if window is None else min(window - 1, keys[0].shape[2])
        last = torch.where(k_doc == q_doc[:, -1:], 0, -1)[:, k_doc.shape[1] - keep :]
        return y, append_kv(None, *keys, keep), (last, k_pos[:, k_pos.shape[1] - keep :])
