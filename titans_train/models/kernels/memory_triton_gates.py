"""The memory kernels' decay coefficients computed from the gates (issue 14), forward and
backward: per chunk and gate set, what ``memory_math.chunk_coeffs`` computes from theta, log eta
and log(1 - alpha), and the gates' gradients from the coefficients'. Below
``memory_triton_ops`` (which calls them), importing nothing of the package."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gate_terms(th_ptr, le_ptr, lk_ptr, base, N: tl.constexpr):
    """One chunk's gates and the masks and matrices both directions need: B_tj =
    exp(segsum log(1 - alpha)), E_ti = exp(segsum log eta) (segment sums as masked cumulative
    sums down the rows, as ``memory_math.segsum``: a -inf log gives an exact 0, never
    inf - inf), B_t0 and E_t0 (cumulative sums)."""
    offs = tl.arange(0, N)
    theta = tl.load(th_ptr + base * N + offs)
    le = tl.load(le_ptr + base * N + offs)
    lk = tl.load(lk_ptr + base * N + offs)
    strict = offs[:, None] > offs[None, :]  # [m, j]: m > j, the terms of segment (j, t]
    incl = offs[:, None] >= offs[None, :]  # [t, j]: j <= t, the lower triangle
    b_mat = tl.where(incl, tl.exp(tl.cumsum(tl.where(strict, lk[:, None], 0.0), 0)), 0.0)
    e_mat = tl.where(incl, tl.exp(tl.cumsum(tl.where(strict, le[:, None], 0.0), 0)), 0.0)
    b0, e0 = tl.exp(tl.cumsum(lk, 0)), tl.exp(tl.cumsum(le, 0))
    return theta, incl, b_mat, e_mat, b0, e0


@triton.jit
def _gate_coeffs(th_ptr, le_ptr, lk_ptr, base, N: tl.constexpr):
    """``_coeffs`` computed from one chunk's gates (theta, log eta, log(1 - alpha), each
    [P, G, chunks, N]) as ``memory_math.chunk_coeffs`` computes them: segment sums as masked
    cumulative sums down the rows (exact at eta = 0 or alpha = 1: a -inf log gives 0, never
    inf - inf), B_tj = exp(segsum log(1 - alpha)), E_ti = exp(segsum log eta),
    c = B E_0, C theta = (B E) theta, E theta."""
    theta, incl, b_mat, e_mat, b0, e0 = _gate_terms(th_ptr, le_ptr, lk_ptr, base, N)
    c0 = tl.sum(b_mat * e0[None, :], 1)
    ct = tl.dot(b_mat, e_mat, input_precision="ieee") * theta[None, :]
    et = e_mat * theta[None, :]
    last = tl.arange(0, N) == N - 1
    b0_end = tl.sum(tl.where(last, b0, 0.0), 0)
    c0_end = tl.sum(tl.where(last, c0, 0.0), 0)
    e0_end = tl.sum(tl.where(last, e0, 0.0), 0)
    ct_end = tl.sum(tl.where(last[:, None], ct, 0.0), 0)
    et_end = tl.sum(tl.where(last[:, None], et, 0.0), 0)
    return b0, c0, ct, b0_end, c0_end, e0_end, ct_end, et_end


@triton.jit
def _masked_cumsum_bwd(g, incl):
    """dL/dx_m = sum_{t >= m} g_t, the backward of a cumulative sum (``incl`` [t, m]: m <= t)."""
    return tl.sum(tl.where(incl, g[:, None], 0.0), 0)


@triton.jit
def _segsum_bwd(ds, incl):
    """Back through S_tj = sum_{j < m <= t} x_m (lower triangle) given dL/dS = ``ds`` (zero above
    the diagonal): dL/dx_m = sum_{t >= m} sum_{j < m} ds_tj."""
    before = tl.cumsum(ds, 1) - ds  # [t, m]: sum_{j < m} ds_tj
    return tl.sum(tl.where(incl, before, 0.0), 0)


@triton.jit
def _gate_coeffs_bwd(th_ptr, le_ptr, lk_ptr, base, N: tl.constexpr, db0, dc0, dct, de0, det):
    """The gates' gradients (theta, log eta, log(1 - alpha)) of one chunk and gate set from the
    full gradients of its coefficients B_t0, c_t, C theta, E_t0, E theta (``_gate_coeffs``'
    backward; entries above the diagonal of dct, det are ignored, as there the coefficients
    are constant zeros)."""
    theta, incl, b_mat, e_mat, b0, e0 = _gate_terms(th_ptr, le_ptr, lk_ptr, base, N)
    dct, det = tl.where(incl, dct, 0.0), tl.where(incl, det, 0.0)
    be = tl.dot(b_mat, e_mat, input_precision="ieee")
    dth = tl.sum(dct * be + det * e_mat, 0)  # C theta = (B E) theta, E theta
    dx = dct * theta[None, :]
    db = tl.dot(dx, tl.trans(e_mat), input_precision="ieee") + dc0[:, None] * e0[None, :]
    de = tl.dot(tl.trans(b_mat), dx, input_precision="ieee") + det * theta[None, :]
    de0 = de0 + tl.sum(b_mat * dc0[:, None], 0)  # c = B E_0
    dlk = _segsum_bwd(tl.where(incl, db * b_mat, 0.0), incl)
    dlk += _masked_cumsum_bwd(db0 * b0, incl)
    dle = _segsum_bwd(tl.where(incl, de * e_mat, 0.0), incl)
    dle += _masked_cumsum_bwd(de0 * e0, incl)
    return dth, dle, dlk
