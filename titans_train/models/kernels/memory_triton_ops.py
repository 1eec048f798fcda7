"""The Triton device functions the memory kernels share (forward: memory_triton,
memory_triton_streamed; backward: memory_triton_bwd, memory_triton_streamed_bwd). One module
below the four, so that no kernel module imports another that imports it back."""

from __future__ import annotations

import triton
import triton.language as tl

# Globals a jit function reads must be constexpr (the interpreter does not check this; the
# compiler does).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))


@triton.jit
def _gelu_grad(z):
    """d GELU(z) / dz for the exact (erf) GELU: Phi(z) + z phi(z)."""
    return 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI


@triton.jit
def _layer_norm(z, D: tl.constexpr, EPS: tl.constexpr, md, PAD: tl.constexpr):
    """Parameter-free LayerNorm over rows: (normalised z, 1 / std per row). ``z`` is [rows, BD]
    with zeros past the true width D (mask ``md``): statistics over D, output zero there."""
    zc = z - (tl.sum(z, 1) / D)[:, None]
    if PAD:
        zc = tl.where(md[None, :], zc, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, 1) / D + EPS)
    return zc * rstd[:, None], rstd


@triton.jit
def _layer_norm_grad(xhat, rstd, g, D: tl.constexpr, md, PAD: tl.constexpr):
    """dL/dz given dL/dLN(z) = g (rows): rstd (g - mean g - xhat mean(g xhat)); g is zero past
    the true width D, and so is the result."""
    mg = tl.sum(g, 1) / D
    mgx = tl.sum(g * xhat, 1) / D
    out = rstd[:, None] * (g - mg[:, None] - xhat * mgx[:, None])
    if PAD:
        out = tl.where(md[None, :], out, 0.0)
    return out


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _coeffs(b0_ptr, c0_ptr, ct_ptr, e0_ptr, et_ptr, base, N: tl.constexpr):
    """One layer's coefficients of one chunk: B_t0, c_t, C_ti theta_i (rows t), and the last
    rows/entries the commit needs. ``base`` = ((p G + g) chunks + c)."""
    offs = tl.arange(0, N)
    b0 = tl.load(b0_ptr + base * N + offs)
    c0 = tl.load(c0_ptr + base * N + offs)
    ct = tl.load(ct_ptr + base * N * N + offs[:, None] * N + offs[None, :])
    b0_end = tl.load(b0_ptr + base * N + N - 1)
    c0_end = tl.load(c0_ptr + base * N + N - 1)
    e0_end = tl.load(e0_ptr + base * N + N - 1)
    ct_end = tl.load(ct_ptr + base * N * N + (N - 1) * N + offs)
    et_end = tl.load(et_ptr + base * N * N + (N - 1) * N + offs)
    return b0, c0, ct, b0_end, c0_end, e0_end, ct_end, et_end


@triton.jit
def _dual_read(h, w, s, a, delta, b0, c0, ct):
    """z_t = h_t [B_t0 W + c_t S] - sum_{i<=t} C_ti theta_i (h_t . a_i) delta_i (ct is lower
    triangular already: exp(-inf) above the diagonal)."""
    z = b0[:, None] * _dot(h, w) + c0[:, None] * _dot(h, s)
    return z - _dot(ct * _dot(h, tl.trans(a)), delta)


@triton.jit
def _commit(w, s, a, delta, b0_end, c0_end, e0_end, ct_end, et_end):
    at = tl.trans(a)
    w_new = b0_end * w + c0_end * s - _dot(at, ct_end[:, None] * delta)
    s_new = e0_end * s - _dot(at, et_end[:, None] * delta)
    return w_new, s_new


@triton.jit
def _gelu_grad2(z):
    """GELU''(z) = phi(z) (2 - z^2)."""
    return tl.exp(-0.5 * z * z) * _INV_SQRT_2PI * (2.0 - z * z)


@triton.jit
def _row_coeffs(b0_ptr, c0_ptr, ct_ptr, e0_ptr, et_ptr, base, N: tl.constexpr):
    offs = tl.arange(0, N)
    b0 = tl.load(b0_ptr + base * N + offs)
    c0 = tl.load(c0_ptr + base * N + offs)
    ct = tl.load(ct_ptr + base * N * N + offs[:, None] * N + offs[None, :])
    e0_end = tl.load(e0_ptr + base * N + N - 1)
    et_end = tl.load(et_ptr + base * N * N + (N - 1) * N + offs)
    return b0, c0, ct, e0_end, et_end


@triton.jit
def _commit_bwd(w, s, a, d, dwn, dsn, b0, c0, ct, e0_end, et_end, N: tl.constexpr):
    """Backward of W' = B W + c S - a^T (ct_end d), S' = E S - a^T (et_end d), given dW', dS'.
    Returns dW, dS, da, dd and the coefficient gradients (scalars for the last entries, the
    rows for ct_end and et_end)."""
    last = tl.arange(0, N) == N - 1
    b0_end = tl.sum(tl.where(last, b0, 0.0), 0)
    c0_end = tl.sum(tl.where(last, c0, 0.0), 0)
    ct_end = tl.sum(tl.where(last[:, None], ct, 0.0), 0)
    dw = b0_end * dwn
    ds = c0_end * dwn + e0_end * dsn
    db0_end = tl.sum(tl.sum(w * dwn, 1), 0)
    dc0_end = tl.sum(tl.sum(s * dwn, 1), 0)
    de0_end = tl.sum(tl.sum(s * dsn, 1), 0)
    x, y = ct_end[:, None] * d, et_end[:, None] * d
    da = -(_dot(x, tl.trans(dwn)) + _dot(y, tl.trans(dsn)))
    dx, dy = -_dot(a, dwn), -_dot(a, dsn)
    dd = ct_end[:, None] * dx + et_end[:, None] * dy
    dct_end, det_end = tl.sum(d * dx, 1), tl.sum(d * dy, 1)
    return dw, ds, da, dd, db0_end, dc0_end, de0_end, dct_end, det_end


@triton.jit
def _read_bwd(h, w, s, a, d, b0, c0, ct, p, gu):
    """Backward of u = b0 (h W) + c0 (h S) - (ct * p) d with p = h a^T, given du = gu."""
    bg, cg = b0[:, None] * gu, c0[:, None] * gu
    dw, ds = _dot(tl.trans(h), bg), _dot(tl.trans(h), cg)
    db0 = tl.sum(gu * _dot(h, w), 1)
    dc0 = tl.sum(gu * _dot(h, s), 1)
    da_mat = -_dot(gu, tl.trans(d))
    dd = -_dot(tl.trans(ct * p), gu)
    dct = da_mat * p
    dp = da_mat * ct
    dh = _dot(bg, tl.trans(w)) + _dot(cg, tl.trans(s)) + _dot(dp, a)
    da = _dot(tl.trans(dp), h)
    return dw, ds, db0, dc0, dct, dh, da, dd


@triton.jit
def _store_coeff_grads(
    db0_ptr, dc0_ptr, dct_ptr, de0_ptr, det_ptr, base, db0, dc0, dct, de0_end, det_end, ct_end_g,
    db0_end, dc0_end, N: tl.constexpr,
):  # fmt: skip
    """Adds the commit's last-row/last-entry gradients and stores one layer's (or the summed
    layers') coefficient gradients of one chunk."""
    on = tl.arange(0, N)
    last = on == N - 1
    tl.store(db0_ptr + base * N + on, db0 + tl.where(last, db0_end, 0.0))
    tl.store(dc0_ptr + base * N + on, dc0 + tl.where(last, dc0_end, 0.0))
    tl.store(de0_ptr + base * N + on, tl.where(last, de0_end, 0.0) + 0.0 * db0)
    mat = base * N * N + on[:, None] * N + on[None, :]
    tl.store(dct_ptr + mat, dct + tl.where(last[:, None], ct_end_g[None, :], 0.0))
    tl.store(det_ptr + mat, tl.where(last[:, None], det_end[None, :], 0.0) + 0.0 * dct)
