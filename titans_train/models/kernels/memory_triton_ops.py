"""The Triton device functions the memory kernels share (forward: memory_triton,
memory_triton_streamed; backward: memory_triton_bwd, memory_triton_streamed_bwd). One module
below the four, so that no kernel module imports another that imports it back."""

from __future__ import annotations

import triton
import triton.language as tl

from .memory_triton_gates import _gate_coeffs, _gate_coeffs_bwd

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
def _row_coeffs(b0_ptr, c0_ptr, ct_ptr, e0_ptr, et_ptr, base, N: tl.constexpr):
    """The coefficients the backward loads (``_coeffs`` without the last entries it slices from
    these rows): B_t0, c_t, C_ti theta_i, E_N0 and the last row of E_ti theta_i."""
    offs = tl.arange(0, N)
    b0 = tl.load(b0_ptr + base * N + offs)
    c0 = tl.load(c0_ptr + base * N + offs)
    ct = tl.load(ct_ptr + base * N * N + offs[:, None] * N + offs[None, :])
    e0_end = tl.load(e0_ptr + base * N + N - 1)
    et_end = tl.load(et_ptr + base * N * N + (N - 1) * N + offs)
    return b0, c0, ct, e0_end, et_end


@triton.jit
def _coeffs(b0_ptr, c0_ptr, ct_ptr, e0_ptr, et_ptr, base, N: tl.constexpr):
    """One layer's coefficients of one chunk: B_t0, c_t, C_ti theta_i (rows t), and the last
    rows/entries the commit needs. ``base`` = ((p G + g) chunks + c)."""
    b0, c0, ct, e0_end, et_end = _row_coeffs(b0_ptr, c0_ptr, ct_ptr, e0_ptr, et_ptr, base, N)
    b0_end = tl.load(b0_ptr + base * N + N - 1)
    c0_end = tl.load(c0_ptr + base * N + N - 1)
    ct_end = tl.load(ct_ptr + base * N * N + (N - 1) * N + tl.arange(0, N))
    return b0, c0, ct, b0_end, c0_end, e0_end, ct_end, et_end


@triton.jit
def _chunk_row_coeffs(b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr, base, N: tl.constexpr,
                      GATES: tl.constexpr):  # fmt: skip
    """``_row_coeffs`` loaded, or (GATES) computed from the gates as ``_chunk_coeffs``."""
    if GATES:
        co = _gate_coeffs(b0_ptr, e0_ptr, c0_ptr, base, N)
        rows = co[0], co[1], co[2], co[5], co[7]
    else:
        rows = _row_coeffs(b0_ptr, c0_ptr, ct_ptr, e0_ptr, et_ptr, base, N)
    return rows


@triton.jit
def _chunk_coeffs(b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr, base, N: tl.constexpr,
                  GATES: tl.constexpr):  # fmt: skip
    """One layer's coefficients of one chunk (``_coeffs``): loaded, or with GATES computed in
    the kernel from the gates theta, log eta, log(1 - alpha) that the first three pointers then
    point to (``_gate_coeffs``)."""
    if GATES:
        co = _gate_coeffs(b0_ptr, e0_ptr, c0_ptr, base, N)
    else:
        co = _coeffs(b0_ptr, c0_ptr, ct_ptr, e0_ptr, et_ptr, base, N)
    return co


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
    db0_end, dc0_end, gp, N: tl.constexpr, GATES: tl.constexpr,
):  # fmt: skip
    """Adds the commit's last-row/last-entry gradients to one layer's (or the summed layers')
    coefficient gradients of one chunk and stores them; with GATES takes them on to the gates
    (``gp``: theta, log eta, log(1 - alpha) pointers) and stores those in the db0, de0, dc0
    slots."""
    on = tl.arange(0, N)
    last = on == N - 1
    db0 = db0 + tl.where(last, db0_end, 0.0)
    dc0 = dc0 + tl.where(last, dc0_end, 0.0)
    de0 = tl.where(last, de0_end, 0.0) + 0.0 * db0
    dct = dct + tl.where(last[:, None], ct_end_g[None, :], 0.0)
    det = tl.where(last[:, None], det_end[None, :], 0.0) + 0.0 * dct
    if GATES:
        dth, dle, dlk = _gate_coeffs_bwd(gp[0], gp[1], gp[2], base, N, db0, dc0, dct, de0, det)
        tl.store(db0_ptr + base * N + on, dth)
        tl.store(de0_ptr + base * N + on, dle)
        tl.store(dc0_ptr + base * N + on, dlk)
    else:
        tl.store(db0_ptr + base * N + on, db0)
        tl.store(dc0_ptr + base * N + on, dc0)
        tl.store(de0_ptr + base * N + on, de0)
        mat = base * N * N + on[:, None] * N + on[None, :]
        tl.store(dct_ptr + mat, dct)
        tl.store(det_ptr + mat, det)


@triton.jit
def _store_chunk_coeff_grads(
    db0_ptr, dc0_ptr, dct_ptr, de0_ptr, det_ptr, g, c, G, CHUNKS, ga, gb, gp, PB: tl.constexpr,
    TWO: tl.constexpr, N: tl.constexpr, GATES: tl.constexpr,
):  # fmt: skip
    """Stores chunk c's coefficient gradients: ``ga``, ``gb`` are layer A's and B's (read: b0,
    c0, C theta; commit: b0_end, c0_end, e0_end, C theta_end, E theta_end), summed when the
    layers share one gate set (PB 0), stored apart when per-layer (PB 1); depth 1 (not TWO):
    layer A's alone. GATES: the gates' gradients instead (``_store_coeff_grads``)."""
    base_a = g * CHUNKS + c
    if TWO and PB == 0:
        gs = (ga[0] + gb[0], ga[1] + gb[1], ga[2] + gb[2], ga[3] + gb[3], ga[4] + gb[4],
              ga[5] + gb[5], ga[6] + gb[6], ga[7] + gb[7])  # fmt: skip
    else:
        gs = ga
    _store_coeff_grads(db0_ptr, dc0_ptr, dct_ptr, de0_ptr, det_ptr, base_a, gs[0], gs[1], gs[2],
                       gs[5], gs[7], gs[6], gs[3], gs[4], gp, N, GATES)  # fmt: skip
    if TWO and PB != 0:
        _store_coeff_grads(db0_ptr, dc0_ptr, dct_ptr, de0_ptr, det_ptr, (G + g) * CHUNKS + c,
                           gb[0], gb[1], gb[2], gb[5], gb[7], gb[6], gb[3], gb[4], gp, N,
                           GATES)  # fmt: skip


# -- Offsets, loads and stores shared by the register and the streamed kernels ----------------


@triton.jit
def _token_ptrs(g, c, T, D: tl.constexpr, N: tl.constexpr, BD: tl.constexpr):
    """Offsets [N, BD] and mask of chunk c's tokens in group g's rows of a [G, T, D] tensor."""
    on, od = tl.arange(0, N), tl.arange(0, BD)
    tok = g * T * D + (c * N + on)[:, None] * D + od[None, :]
    return tok, (on < N)[:, None] & (od < D)[None, :]


@triton.jit
def _tile_ptrs(g, j, D: tl.constexpr, H: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    """Offsets and masks of hidden tile j of group g's state: layer A's columns [BD, BT] of its
    [D, H], layer B's rows [BT, BD] of its [H, D]. The register kernels hold the whole hidden
    as one tile (j = 0, BT = its block; at depth 1 layer A is [D, D] and B unused)."""
    od, ot = tl.arange(0, BD), j * BT + tl.arange(0, BT)
    md, mt = od < D, ot < H
    a_off = g * D * H + od[:, None] * H + ot[None, :]
    b_off = g * H * D + ot[:, None] * D + od[None, :]
    return a_off, md[:, None] & mt[None, :], b_off, mt[:, None] & md[None, :]


@triton.jit
def _chunk_state_at(g, c, CHUNKS, D: tl.constexpr, H: tl.constexpr):
    """Added to a ``_tile_ptrs`` offset (which holds g D H): chunk c's entry of the saved
    chunk-start states [G, CHUNKS, D, H] (or [.., H, D])."""
    return (g * (CHUNKS - 1) + c) * D * H


@triton.jit
def _load_state(wa_ptr, sa_ptr, wb_ptr, sb_ptr, a_off, a_m, b_off, b_m, TWO: tl.constexpr):
    """W, S of layer A (and B if TWO; else A's again, unused) at these offsets, zero-padded."""
    wa = tl.load(wa_ptr + a_off, a_m, other=0.0)
    sa = tl.load(sa_ptr + a_off, a_m, other=0.0)
    if TWO:
        wb = tl.load(wb_ptr + b_off, b_m, other=0.0)
        sb = tl.load(sb_ptr + b_off, b_m, other=0.0)
    else:
        wb, sb = wa, sa
    return wa, sa, wb, sb


@triton.jit
def _store_state(
    wa_ptr, sa_ptr, wb_ptr, sb_ptr, a_off, a_m, b_off, b_m, wa, sa, wb, sb, TWO: tl.constexpr
):
    tl.store(wa_ptr + a_off, wa, a_m)
    tl.store(sa_ptr + a_off, sa, a_m)
    if TWO:
        tl.store(wb_ptr + b_off, wb, b_m)
        tl.store(sb_ptr + b_off, sb, b_m)


# -- The memory on a chunk's keys and its errors (forward and recompute) -----------------------


@triton.jit
def _out_error(z_out, kc, vc, D: tl.constexpr, EPS: tl.constexpr, md, PAD: tl.constexpr,
               RESNORM: tl.constexpr):  # fmt: skip
    """The inner loss's error at the memory's output pre-activation z_out: with the residual
    LayerNorm (M(k) = k + LN(z)) delta = LN'(z)^T e, e = k + LN(z) - v; else z - v. Returns
    (delta, LN(z), 1 / std, e), the last three for ``_out_error_bwd`` (unused without the
    LayerNorm)."""
    if RESNORM:
        xhat, rstd = _layer_norm(z_out, D, EPS, md, PAD)
        e = kc + xhat - vc
        delta = _layer_norm_grad(xhat, rstd, e, D, md, PAD)
    else:
        delta = z_out - vc
        xhat, rstd, e = z_out, tl.sum(z_out, 1), delta
    return delta, xhat, rstd, e


@triton.jit
def _keys_errors(kc, vc, wa, wb, D: tl.constexpr, EPS: tl.constexpr, md, PAD: tl.constexpr,
                 RESNORM: tl.constexpr, DEPTH: tl.constexpr):  # fmt: skip
    """The memory on a chunk's keys at its start weights (whole state on chip) and its errors:
    (z_1, a_1 = GELU(z_1), g_1 = delta_out W_B^T, delta_1 = g_1 GELU'(z_1), delta_out, and
    ``_out_error``'s LayerNorm terms). At depth 1 the four layer-1 values are unused copies."""
    if DEPTH == 2:
        z1 = _dot(kc, wa)
        a1 = _gelu(z1)
        z_out = _dot(a1, wb)
    else:
        z_out = _dot(kc, wa)
    d_out, xhat, rstd, e = _out_error(z_out, kc, vc, D, EPS, md, PAD, RESNORM)
    if DEPTH == 2:
        g1 = _dot(d_out, tl.trans(wb))
        d1 = g1 * _gelu_grad(z1)
    else:
        z1, a1, g1, d1 = z_out, kc, d_out, d_out
    return z1, a1, g1, d1, d_out, xhat, rstd, e


@triton.jit
def _keys_out_streamed(kc, wa_ptr, wb_ptr, g, D: tl.constexpr, H: tl.constexpr,
                       N: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    """The memory's output on a chunk's keys, z_out = sum_j GELU(k W_Aj) W_Bj, over the hidden
    tiles of the state at ``wa_ptr``, ``wb_ptr`` (the streamed kernels' pass over the keys)."""
    TILES: tl.constexpr = (H + BT - 1) // BT
    z_out = tl.zeros([N, BD], dtype=kc.dtype)
    for j in range(TILES):
        a_off, a_m, b_off, b_m = _tile_ptrs(g, j, D, H, BD, BT)
        a1 = _gelu(_dot(kc, tl.load(wa_ptr + a_off, a_m, other=0.0)))
        z_out += _dot(a1, tl.load(wb_ptr + b_off, b_m, other=0.0))
    return z_out


# -- Backward through the output LayerNorms -----------------------------------------------------


@triton.jit
def _out_error_bwd(xhat, rstd, e, d_out, dd_out, D: tl.constexpr, md, PAD: tl.constexpr,
                   RESNORM: tl.constexpr):  # fmt: skip
    """Back through ``_out_error`` given dL/d(delta_out) = dd_out: (the part of dL/dk through
    e, dL/dv, dL/dz_out). With the LayerNorm, dL/dz_out holds the second-order terms (LN's
    backward differentiated again through LN(z) and 1 / std)."""
    if RESNORM:
        de = _layer_norm_grad(xhat, rstd, dd_out, D, md, PAD)
        m_ex = tl.sum(e * xhat, 1) / D
        m_dx = tl.sum(dd_out * xhat, 1) / D
        dxhat = de - rstd[:, None] * (dd_out * m_ex[:, None] + e * m_dx[:, None])
        dr = tl.sum(dd_out * d_out, 1) / rstd
        dz = _layer_norm_grad(xhat, rstd, dxhat, D, md, PAD)
        dz -= (dr * rstd * rstd / D)[:, None] * xhat
        dk = de
    else:
        dk, de, dz = tl.zeros_like(dd_out), dd_out, dd_out
    return dk, -de, dz


@triton.jit
def _read_norm_bwd(u, dy, D: tl.constexpr, EPS: tl.constexpr, md, PAD: tl.constexpr,
                   RESNORM: tl.constexpr):  # fmt: skip
    """Back through the read y = q + LN(u) (or y = u) given dL/dy: (dL/du, dL/dq direct)."""
    if RESNORM:
        yhat, rstd = _layer_norm(u, D, EPS, md, PAD)
        du = _layer_norm_grad(yhat, rstd, dy, D, md, PAD)
        dq = dy
    else:
        du, dq = dy, tl.zeros_like(dy)
    return du, dq
