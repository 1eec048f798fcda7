"""The forward of the memory's chunk loop for states too large for a program's registers (issue
14, docs/memory.md "Large heads"): depth 2 only, one program per group, the state streamed through
L2 in tiles of the hidden dimension.

The group's M and S live in their global buffers and are updated in place. Per chunk, pass 1 walks
the hidden in tiles of BT (``W_A[:, j]``, ``W_B[j, :]``): ``z_out += GELU(k W_Aj) W_Bj``; then the
LayerNorm and the output error ``delta_out`` (on chip). Pass 2 walks the tiles again with
``S_Aj``, ``S_Bj``: it recomputes ``z_1j``, forms ``delta_1j``, the layer-1 dual read of the tile
and its GELU, accumulates the layer-2 read (``y += h_j (B W_Bj + c S_Bj)``, ``P_2 += h_j a_jT``;
``y -= (C theta * P_2) delta_out`` after the loop), and commits the tile in place (its last use in
the chunk). The register kernel (``memory_triton``) is the one-tile case of the same maths.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .memory_triton_ops import (
    _chunk_coeffs,
    _chunk_state_at,
    _commit,
    _dot,
    _gelu,
    _gelu_grad,
    _keys_out_streamed,
    _layer_norm,
    _load_state,
    _out_error,
    _store_state,
    _tile_ptrs,
    _token_ptrs,
)


@triton.jit
def _memory_scan_streamed_kernel(
    wa_ptr, sa_ptr, wb_ptr, sb_ptr,  # state in/out, updated in place: A [G, D, H], B [G, H, D]
    w0a_ptr, w0b_ptr,  # M_0 per group (document resets)
    k_ptr, v_ptr, q_ptr, y_ptr,  # [G, T, D]
    b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr,  # [P, G, chunks, N(, N)]
    reset_ptr, commit_ptr,  # int8 [G, chunks]
    hwa_ptr, hsa_ptr, hwb_ptr, hsb_ptr,  # SAVE_STATES: W, S at every chunk start [G, chunks, ..]
    G, CHUNKS, T, PB,
    D: tl.constexpr, H: tl.constexpr, N: tl.constexpr, RESNORM: tl.constexpr,
    HAS_Q: tl.constexpr, HAS_FLAGS: tl.constexpr, EPS: tl.constexpr, BD: tl.constexpr,
    BT: tl.constexpr, SAVE_STATES: tl.constexpr = False, GATES: tl.constexpr = False,
):  # fmt: skip
    """One program per group; the same arguments as ``_memory_scan_kernel`` at depth 2, with the
    hidden tile BT (a power of two) instead of its block. Barriers order the in-place stores
    against other threads' loads of the same state (no-ops in the interpreter)."""
    g = tl.program_id(0).to(tl.int64)
    PAD: tl.constexpr = BD != D
    md = tl.arange(0, BD) < D
    TILES: tl.constexpr = (H + BT - 1) // BT

    for c in range(CHUNKS):
        tok, mtok = _token_ptrs(g, c, T, D, N, BD)
        kc, vc = tl.load(k_ptr + tok, mtok, other=0.0), tl.load(v_ptr + tok, mtok, other=0.0)
        if HAS_FLAGS:
            if tl.load(reset_ptr + g * CHUNKS + c) != 0:  # M_0 into the buffer, S to zero
                for j in range(TILES):
                    a_off, a_m, b_off, b_m = _tile_ptrs(g, j, D, H, BD, BT)
                    w0a = tl.load(w0a_ptr + a_off, a_m, other=0.0)
                    w0b = tl.load(w0b_ptr + b_off, b_m, other=0.0)
                    _store_state(wa_ptr, sa_ptr, wb_ptr, sb_ptr, a_off, a_m, b_off, b_m, w0a,
                                 tl.zeros_like(w0a), w0b, tl.zeros_like(w0b), True)  # fmt: skip
            tl.debug_barrier()

        # Pass 1: the memory on the chunk's keys, tile by tile; then its output error.
        z_out = _keys_out_streamed(kc, wa_ptr, wb_ptr, g, D, H, N, BD, BT)
        d_out = _out_error(z_out, kc, vc, D, EPS, md, PAD, RESNORM)[0]
        ca = _chunk_coeffs(b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr, g * CHUNKS + c, N, GATES)
        cb = _chunk_coeffs(
            b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr, (PB * G + g) * CHUNKS + c, N, GATES
        )
        if HAS_FLAGS:
            keep = tl.load(commit_ptr + g * CHUNKS + c) != 0
        if HAS_Q:
            qc = tl.load(q_ptr + tok, mtok, other=0.0)
            p1 = ca[2] * _dot(qc, tl.trans(kc))  # C theta * (q k^T), shared by the tiles
            zq = tl.zeros([N, BD], dtype=kc.dtype)
            p2 = tl.zeros([N, N], dtype=kc.dtype)
        tl.debug_barrier()

        # Pass 2: errors, reads and the commit of each tile.
        for j in range(TILES):
            a_off, a_m, b_off, b_m = _tile_ptrs(g, j, D, H, BD, BT)
            wa, sa, wb, sb = _load_state(wa_ptr, sa_ptr, wb_ptr, sb_ptr, a_off, a_m, b_off, b_m,
                                         True)  # fmt: skip
            if SAVE_STATES:
                h_at = _chunk_state_at(g, c, CHUNKS, D, H)
                _store_state(hwa_ptr + h_at, hsa_ptr + h_at, hwb_ptr + h_at, hsb_ptr + h_at,
                             a_off, a_m, b_off, b_m, wa, sa, wb, sb, True)  # fmt: skip
            z1 = _dot(kc, wa)
            a1 = _gelu(z1)
            d1 = _dot(d_out, tl.trans(wb)) * _gelu_grad(z1)
            if HAS_Q:
                u1 = ca[0][:, None] * _dot(qc, wa) + ca[1][:, None] * _dot(qc, sa)
                hq = _gelu(u1 - _dot(p1, d1))
                zq += cb[0][:, None] * _dot(hq, wb) + cb[1][:, None] * _dot(hq, sb)
                p2 += _dot(hq, tl.trans(a1))
            wa_n, sa_n = _commit(wa, sa, kc, d1, ca[3], ca[4], ca[5], ca[6], ca[7])
            wb_n, sb_n = _commit(wb, sb, a1, d_out, cb[3], cb[4], cb[5], cb[6], cb[7])
            if HAS_FLAGS:  # an uncommitted chunk writes the state back unchanged
                wa_n, sa_n = tl.where(keep, wa_n, wa), tl.where(keep, sa_n, sa)
                wb_n, sb_n = tl.where(keep, wb_n, wb), tl.where(keep, sb_n, sb)
            _store_state(wa_ptr, sa_ptr, wb_ptr, sb_ptr, a_off, a_m, b_off, b_m, wa_n, sa_n,
                         wb_n, sb_n, True)  # fmt: skip
        if HAS_Q:
            zq -= _dot(cb[2] * p2, d_out)
            if RESNORM:
                zq = qc + _layer_norm(zq, D, EPS, md, PAD)[0]
            tl.store(y_ptr + tok, zq, mtok)
        tl.debug_barrier()
