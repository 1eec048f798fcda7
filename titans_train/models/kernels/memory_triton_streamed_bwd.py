"""The fused backward for states too large for registers (issue 14, docs/memory.md "Large
heads"): depth 2, one program per group, the chunk-start states (from the forward) and the
gradient state dM, dS in global memory, the hidden in tiles of BT.

Per chunk, in reverse, four passes over the tiles, because three quantities couple them:
A recomputes the memory on the keys (``z_out``, summed over tiles) for the LayerNorm and
``delta_out``; B recomputes the reads (the layer-2 read and ``P_2 = h a_1^T`` summed over tiles)
for the reads' LayerNorm backward; C back-propagates the commit and the reads tile by tile
(``memory_triton_bwd``'s ``_commit_bwd`` and ``_read_bwd`` apply per tile: a tile's terms are
either its own or partial sums), writes each tile's partial state gradient in place and keeps
the per-tile terms that wait for the LayerNorm's second-order gradient in a scratch buffer; D
finishes the keys' forward once that gradient (``dz_out``) is known.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .memory_triton_ops import (
    _chunk_row_coeffs,
    _chunk_state_at,
    _commit_bwd,
    _dot,
    _gelu,
    _gelu_grad,
    _gelu_grad2,
    _keys_out_streamed,
    _load_state,
    _out_error,
    _out_error_bwd,
    _read_bwd,
    _read_norm_bwd,
    _store_chunk_coeff_grads,
    _store_state,
    _tile_ptrs,
    _token_ptrs,
)


@triton.jit
def _recompute_tile(kc, qc, dl, p1, wa, sa, wb, ca):
    """A tile's z1, a1, g1 = dl W_B^T, d1 and (reads) u1, h1 from its chunk-start weights."""
    z1 = _dot(kc, wa)
    a1 = _gelu(z1)
    g1 = _dot(dl, tl.trans(wb))
    d1 = g1 * _gelu_grad(z1)
    u1 = ca[0][:, None] * _dot(qc, wa) + ca[1][:, None] * _dot(qc, sa) - _dot(ca[2] * p1, d1)
    return z1, a1, g1, d1, u1, _gelu(u1)


@triton.jit
def _scratch_ptrs(g, j, N: tl.constexpr, H: tl.constexpr, BT: tl.constexpr):
    """Offsets and mask of hidden tile j in group g's scratch [G, N, H]."""
    on, ot = tl.arange(0, N), j * BT + tl.arange(0, BT)
    return g * N * H + on[:, None] * H + ot[None, :], (on < N)[:, None] & (ot < H)[None, :]


@triton.jit
def _memory_scan_streamed_bwd_kernel(
    hwa_ptr, hsa_ptr, hwb_ptr, hsb_ptr,  # chunk-start states from the forward [G, chunks, ..]
    k_ptr, v_ptr, q_ptr, dy_ptr,  # [G, T, D]
    b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr,  # [P, G, chunks, N(, N)]
    reset_ptr, commit_ptr,  # int8 [G, chunks]
    dwa_ptr, dsa_ptr, dwb_ptr, dsb_ptr,  # in: dL/d(final state); out: dL/d(group-start state)
    dw0a_ptr, dw0b_ptr,  # out, zero on entry: dL/dM_0 per group
    dk_ptr, dv_ptr, dq_ptr,  # out [G, T, D]
    db0_ptr, de0_ptr, dc0_ptr, dct_ptr, det_ptr,  # out, like the coefficients
    sa1_ptr, sz1_ptr,  # scratch [G, N, H]: a tile's partial dL/da1 and dL/dz1 from C to D
    G, CHUNKS, T,
    PB: tl.constexpr, D: tl.constexpr, H: tl.constexpr, N: tl.constexpr,
    RESNORM: tl.constexpr, HAS_FLAGS: tl.constexpr, EPS: tl.constexpr,
    BD: tl.constexpr, BT: tl.constexpr,
    GATES: tl.constexpr = False,  # b0, e0, c0 hold theta, log eta, log(1 - alpha); grads too
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)
    PAD: tl.constexpr = BD != D
    md = tl.arange(0, BD) < D
    TILES: tl.constexpr = (H + BT - 1) // BT
    for i in range(CHUNKS):
        c = CHUNKS - 1 - i
        h_at = _chunk_state_at(g, c, CHUNKS, D, H)
        hwa, hsa, hwb, hsb = hwa_ptr + h_at, hsa_ptr + h_at, hwb_ptr + h_at, hsb_ptr + h_at
        tok, mtok = _token_ptrs(g, c, T, D, N, BD)
        kc, vc = tl.load(k_ptr + tok, mtok, other=0.0), tl.load(v_ptr + tok, mtok, other=0.0)
        qc, dyc = tl.load(q_ptr + tok, mtok, other=0.0), tl.load(dy_ptr + tok, mtok, other=0.0)
        ca = _chunk_row_coeffs(b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr, g * CHUNKS + c, N, GATES)
        cb = _chunk_row_coeffs(
            b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr, (PB * G + g) * CHUNKS + c, N, GATES
        )

        # A: the memory on the keys, its LayerNorm and error.
        zo = _keys_out_streamed(kc, hwa, hwb, g, D, H, N, BD, BT)
        dl, xhat, r, e = _out_error(zo, kc, vc, D, EPS, md, PAD, RESNORM)
        p1 = _dot(qc, tl.trans(kc))

        # B: the reads (layer 2 summed over tiles), their LayerNorm backward.
        u2 = tl.zeros([N, BD], dtype=kc.dtype)
        p2 = tl.zeros([N, N], dtype=kc.dtype)
        for j in range(TILES):
            a_off, a_m, b_off, b_m = _tile_ptrs(g, j, D, H, BD, BT)
            wa, sa, wb, sb = _load_state(hwa, hsa, hwb, hsb, a_off, a_m, b_off, b_m, True)
            z1, a1, g1, d1, u1, h1 = _recompute_tile(kc, qc, dl, p1, wa, sa, wb, ca)
            u2 += cb[0][:, None] * _dot(h1, wb) + cb[1][:, None] * _dot(h1, sb)
            p2 += _dot(h1, tl.trans(a1))
        u2 -= _dot(cb[2] * p2, dl)
        du, dq = _read_norm_bwd(u2, dyc, D, EPS, md, PAD, RESNORM)
        # The layer-2 read's terms that are whole-chunk quantities (not per tile).
        da_mat_b = -_dot(du, tl.trans(dl))
        dct_b = da_mat_b * p2
        ddl = -_dot(tl.trans(cb[2] * p2), du)

        keep = True
        if HAS_FLAGS:
            keep = tl.load(commit_ptr + g * CHUNKS + c) != 0
        dk = tl.zeros([N, BD], dtype=kc.dtype)
        # Partial sums over tiles: read coefficients (A: b0, c0, C theta; B: b0, c0) and the
        # commit's last-row terms (b0_end, c0_end, e0_end, C theta_end, E theta_end per layer).
        rs_a0, rs_a1, rs_a2 = tl.zeros([N], kc.dtype), tl.zeros([N], kc.dtype), 0.0 * p1
        rs_b0, rs_b1 = tl.zeros([N], kc.dtype), tl.zeros([N], kc.dtype)
        z0 = tl.sum(tl.zeros([N], dtype=kc.dtype), 0)  # a scalar of the loop's dtype
        ma4, ma5, ma6, mb4, mb5, mb6 = z0, z0, z0, z0, z0, z0
        ma7, ma8 = tl.zeros([N], kc.dtype), tl.zeros([N], kc.dtype)
        mb7, mb8 = tl.zeros([N], kc.dtype), tl.zeros([N], kc.dtype)
        tl.debug_barrier()

        # C: commit and reads, tile by tile; partial state gradients written in place.
        for j in range(TILES):
            a_off, a_m, b_off, b_m = _tile_ptrs(g, j, D, H, BD, BT)
            wa, sa, wb, sb = _load_state(hwa, hsa, hwb, hsb, a_off, a_m, b_off, b_m, True)
            z1, a1, g1, d1, u1, h1 = _recompute_tile(kc, qc, dl, p1, wa, sa, wb, ca)
            dwa_n, dsa_n, dwb_n, dsb_n = _load_state(dwa_ptr, dsa_ptr, dwb_ptr, dsb_ptr, a_off,
                                                     a_m, b_off, b_m, True)  # fmt: skip
            # An uncommitted chunk passes dW', dS' straight to its start state.
            cwa, csa = tl.where(keep, dwa_n, 0.0), tl.where(keep, dsa_n, 0.0)
            cwb, csb = tl.where(keep, dwb_n, 0.0), tl.where(keep, dsb_n, 0.0)
            ma = _commit_bwd(wa, sa, kc, d1, cwa, csa, ca[0], ca[1], ca[2], ca[3], ca[4], N)
            mb = _commit_bwd(wb, sb, a1, dl, cwb, csb, cb[0], cb[1], cb[2], cb[3], cb[4], N)
            rb = _read_bwd(h1, wb, sb, a1, dl, cb[0], cb[1], cb[2], p2, du)
            ra = _read_bwd(qc, wa, sa, kc, d1, ca[0], ca[1], ca[2], p1, rb[5] * _gelu_grad(u1))
            dq += ra[5]
            dk += ma[2] + ra[6]
            dd1 = ma[3] + ra[7]
            ddl += mb[3]
            dg1 = dd1 * _gelu_grad(z1)
            ddl += _dot(dg1, wb)
            rs_a0, rs_a1, rs_a2 = rs_a0 + ra[2], rs_a1 + ra[3], rs_a2 + ra[4]
            rs_b0, rs_b1 = rs_b0 + rb[2], rs_b1 + rb[3]
            ma4, ma5, ma6, ma7, ma8 = (
                ma4 + ma[4],
                ma5 + ma[5],
                ma6 + ma[6],
                ma7 + ma[7],
                ma8 + ma[8],
            )
            mb4, mb5, mb6, mb7, mb8 = (
                mb4 + mb[4],
                mb5 + mb[5],
                mb6 + mb[6],
                mb7 + mb[7],
                mb8 + mb[8],
            )
            s_off, s_m = _scratch_ptrs(g, j, N, H, BT)
            tl.debug_barrier()
            tl.store(sa1_ptr + s_off, mb[2] + rb[6], s_m)
            tl.store(sz1_ptr + s_off, dd1 * g1 * _gelu_grad2(z1), s_m)
            _store_state(
                dwa_ptr, dsa_ptr, dwb_ptr, dsb_ptr, a_off, a_m, b_off, b_m,
                ma[0] + ra[0] + dwa_n - cwa, ma[1] + ra[1] + dsa_n - csa,
                mb[0] + rb[0] + _dot(tl.trans(dg1), dl) + dwb_n - cwb, mb[1] + rb[1] + dsb_n - csb,
                True,
            )  # fmt: skip

        # The output LayerNorm's backward, second-order terms included (as memory_triton_bwd).
        dk_e, dv, dzo = _out_error_bwd(xhat, r, e, dl, ddl, D, md, PAD, RESNORM)
        dk += dk_e
        reset = False
        if HAS_FLAGS:
            reset = tl.load(reset_ptr + g * CHUNKS + c) != 0
        tl.debug_barrier()

        # D: the keys' forward, now that dz_out is known; then a reset sends the state's
        # gradient to M_0 (S restarts at 0).
        for j in range(TILES):
            a_off, a_m, b_off, b_m = _tile_ptrs(g, j, D, H, BD, BT)
            wa = tl.load(hwa + a_off, a_m, other=0.0)
            wb = tl.load(hwb + b_off, b_m, other=0.0)
            z1 = _dot(kc, wa)
            s_off, s_m = _scratch_ptrs(g, j, N, H, BT)
            da1 = tl.load(sa1_ptr + s_off, s_m, other=0.0) + _dot(dzo, tl.trans(wb))
            dz1 = tl.load(sz1_ptr + s_off, s_m, other=0.0) + da1 * _gelu_grad(z1)
            dk += _dot(dz1, tl.trans(wa))
            dwa, dsa, dwb, dsb = _load_state(dwa_ptr, dsa_ptr, dwb_ptr, dsb_ptr, a_off, a_m, b_off,
                                             b_m, True)  # fmt: skip
            dwa += _dot(tl.trans(kc), dz1)
            dwb += _dot(tl.trans(_gelu(z1)), dzo)
            if HAS_FLAGS:
                w0a = tl.load(dw0a_ptr + a_off, a_m, other=0.0)
                w0b = tl.load(dw0b_ptr + b_off, b_m, other=0.0)
                tl.debug_barrier()
                tl.store(dw0a_ptr + a_off, w0a + tl.where(reset, dwa, 0.0), a_m)
                tl.store(dw0b_ptr + b_off, w0b + tl.where(reset, dwb, 0.0), b_m)
                dwa, dsa = tl.where(reset, 0.0, dwa), tl.where(reset, 0.0, dsa)
                dwb, dsb = tl.where(reset, 0.0, dwb), tl.where(reset, 0.0, dsb)
            tl.debug_barrier()
            _store_state(dwa_ptr, dsa_ptr, dwb_ptr, dsb_ptr, a_off, a_m, b_off, b_m, dwa, dsa, dwb,
                         dsb, True)  # fmt: skip
        tl.store(dk_ptr + tok, dk, mtok)
        tl.store(dv_ptr + tok, dv, mtok)
        tl.store(dq_ptr + tok, dq, mtok)

        # Coefficient gradients (summed over layers when they share one gate set).
        ga = (rs_a0, rs_a1, rs_a2, ma4, ma5, ma6, ma7, ma8)
        gb = (rs_b0, rs_b1, dct_b, mb4, mb5, mb6, mb7, mb8)
        _store_chunk_coeff_grads(db0_ptr, dc0_ptr, dct_ptr, de0_ptr, det_ptr, g, c, G, CHUNKS,
                                 ga, gb, (b0_ptr, e0_ptr, c0_ptr), PB, True, N,
                                 GATES)  # fmt: skip
        tl.debug_barrier()
