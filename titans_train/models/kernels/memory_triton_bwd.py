"""The fused backward of the memory's chunk loop (issue 14): one program per group walks the
chunks of a checkpoint group in reverse, from the chunk-start states the forward kernel saved.

Per chunk it recomputes the chunk's intermediates (memory on the keys, errors, dual-form reads)
and back-propagates through ``chunk_step`` by hand, second-order terms included (the inner
gradient depends on the weights: LayerNorm's backward is differentiated again, and GELU'' enters
through the errors). Outputs: gradients of k, v, q, the five coefficient tensors (or, given
the gates, the gates'), the state at the group start and M_0 (document resets). The derivation
is checked term by term against autograd through ``memory_math.chunk_step``
(tests/test_memory_triton.py, tests/test_memory_triton_gates.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..memory_math import LN_EPS
from . import backward_tile, block_width, launch_device, state_elements, stream_tile
from .memory_triton import dims_of, num_warps
from .memory_triton_ops import (
    _chunk_row_coeffs,
    _chunk_state_at,
    _commit_bwd,
    _dot,
    _gelu,
    _gelu_grad,
    _gelu_grad2,
    _keys_errors,
    _load_state,
    _out_error_bwd,
    _read_bwd,
    _read_norm_bwd,
    _store_chunk_coeff_grads,
    _store_state,
    _tile_ptrs,
    _token_ptrs,
)


@triton.jit
def _memory_scan_bwd_kernel(
    hwa_ptr, hsa_ptr, hwb_ptr, hsb_ptr,  # chunk-start states from the forward [G, chunks, ..]
    k_ptr, v_ptr, q_ptr, dy_ptr,  # [G, T, D]
    b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr,  # [P, G, chunks, N(, N)]
    reset_ptr, commit_ptr,  # int8 [G, chunks]
    dwa_ptr, dsa_ptr, dwb_ptr, dsb_ptr,  # in: dL/d(final state); out: dL/d(group-start state)
    dw0a_ptr, dw0b_ptr,  # out: dL/dM_0 per group
    dk_ptr, dv_ptr, dq_ptr,  # out [G, T, D]
    db0_ptr, de0_ptr, dc0_ptr, dct_ptr, det_ptr,  # out, like the coefficients
    G, CHUNKS, T,
    PB: tl.constexpr, D: tl.constexpr, H: tl.constexpr, N: tl.constexpr, DEPTH: tl.constexpr,
    RESNORM: tl.constexpr, HAS_FLAGS: tl.constexpr, EPS: tl.constexpr,
    BD: tl.constexpr, BH: tl.constexpr,
    GATES: tl.constexpr = False,  # b0, e0, c0 hold theta, log eta, log(1 - alpha); grads too
):  # fmt: skip
    """One program per group; PB: gate set of layer B (0 = shared with layer A). Widths D, H in
    blocks BD, BH as in the forward kernel: the padding loads as zeros and every gradient stays
    zero there (LayerNorm's, masked, reduce over D)."""
    g = tl.program_id(0).to(tl.int64)
    PAD: tl.constexpr = BD != D
    TWO: tl.constexpr = DEPTH == 2
    md = tl.arange(0, BD) < D
    a_idx, mask_a, b_idx, mask_b = _tile_ptrs(g, 0, D, H, BD, BH)
    dwa, dsa, dwb, dsb = _load_state(dwa_ptr, dsa_ptr, dwb_ptr, dsb_ptr, a_idx, mask_a, b_idx,
                                     mask_b, TWO)  # fmt: skip
    dw0a = tl.zeros([BD, BH], dtype=dwa.dtype)
    if TWO:
        dw0b = tl.zeros([BH, BD], dtype=dwa.dtype)

    for i in range(CHUNKS):
        c = CHUNKS - 1 - i
        h_at = _chunk_state_at(g, c, CHUNKS, D, H)
        wa, sa, wb, sb = _load_state(hwa_ptr + h_at, hsa_ptr + h_at, hwb_ptr + h_at,
                                     hsb_ptr + h_at, a_idx, mask_a, b_idx, mask_b, TWO)  # fmt: skip
        tok, mt = _token_ptrs(g, c, T, D, N, BD)
        kc, vc = tl.load(k_ptr + tok, mt, other=0.0), tl.load(v_ptr + tok, mt, other=0.0)
        qc, dyc = tl.load(q_ptr + tok, mt, other=0.0), tl.load(dy_ptr + tok, mt, other=0.0)
        ca = _chunk_row_coeffs(b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr, g * CHUNKS + c, N, GATES)
        if TWO:
            cb = _chunk_row_coeffs(
                b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr, (PB * G + g) * CHUNKS + c, N, GATES
            )

        # Recompute: memory on the keys and its errors, then the dual-form reads.
        z1, a1, g1, d1, dl, xhat, r, e = _keys_errors(kc, vc, wa, wb, D, EPS, md, PAD, RESNORM,
                                                      DEPTH)  # fmt: skip
        p1 = _dot(qc, tl.trans(kc))
        if TWO:
            u1 = ca[0][:, None] * _dot(qc, wa) + ca[1][:, None] * _dot(qc, sa)
            u1 = u1 - _dot(ca[2] * p1, d1)
            h1 = _gelu(u1)
            p2 = _dot(h1, tl.trans(a1))
            u2 = cb[0][:, None] * _dot(h1, wb) + cb[1][:, None] * _dot(h1, sb)
            u2 = u2 - _dot(cb[2] * p2, dl)
        else:
            u2 = ca[0][:, None] * _dot(qc, wa) + ca[1][:, None] * _dot(qc, sa)
            u2 = u2 - _dot(ca[2] * p1, dl)

        # Commit (an uncommitted chunk passes dW', dS' straight to its start state).
        dwa_n, dsa_n, pass_wa, pass_sa = dwa, dsa, 0.0 * dwa, 0.0 * dsa
        if TWO:
            dwb_n, dsb_n, pass_wb, pass_sb = dwb, dsb, 0.0 * dwb, 0.0 * dsb
        if HAS_FLAGS:
            keep = tl.load(commit_ptr + g * CHUNKS + c) != 0
            dwa_n, dsa_n = tl.where(keep, dwa, 0.0), tl.where(keep, dsa, 0.0)
            pass_wa, pass_sa = dwa - dwa_n, dsa - dsa_n
            if TWO:
                dwb_n, dsb_n = tl.where(keep, dwb, 0.0), tl.where(keep, dsb, 0.0)
                pass_wb, pass_sb = dwb - dwb_n, dsb - dsb_n
        ma = _commit_bwd(wa, sa, kc, d1, dwa_n, dsa_n, ca[0], ca[1], ca[2], ca[3], ca[4], N)
        if TWO:
            mb = _commit_bwd(wb, sb, a1, dl, dwb_n, dsb_n, cb[0], cb[1], cb[2], cb[3], cb[4], N)

        # Reads.
        du, dq = _read_norm_bwd(u2, dyc, D, EPS, md, PAD, RESNORM)
        if TWO:
            rb = _read_bwd(h1, wb, sb, a1, dl, cb[0], cb[1], cb[2], p2, du)
            ra = _read_bwd(qc, wa, sa, kc, d1, ca[0], ca[1], ca[2], p1, rb[5] * _gelu_grad(u1))
        else:
            ra = _read_bwd(qc, wa, sa, kc, dl, ca[0], ca[1], ca[2], p1, du)
        dq += ra[5]

        # Errors: d1 = (dl W_B^T) * GELU'(z1); dl = LN'(zo)^T e (or zo - v).
        dk = ma[2] + ra[6]
        if TWO:
            dd1 = ma[3] + ra[7]
            ddl = mb[3] + rb[7]
            dg1 = dd1 * _gelu_grad(z1)
            dz1 = dd1 * g1 * _gelu_grad2(z1)
            ddl += _dot(dg1, wb)
            dwb_k = _dot(tl.trans(dg1), dl)
        else:
            ddl = ma[3] + ra[7]
        dk_e, dv, dzo = _out_error_bwd(xhat, r, e, dl, ddl, D, md, PAD, RESNORM)
        dk += dk_e
        # The memory on the keys.
        if TWO:
            dwb_k += _dot(tl.trans(a1), dzo)
            da1 = mb[2] + rb[6] + _dot(dzo, tl.trans(wb))
            dz1 += da1 * _gelu_grad(z1)
            dwa_k = _dot(tl.trans(kc), dz1)
            dk += _dot(dz1, tl.trans(wa))
        else:
            dwa_k = _dot(tl.trans(kc), dzo)
            dk += _dot(dzo, tl.trans(wa))
        tl.store(dk_ptr + tok, dk, mt)
        tl.store(dv_ptr + tok, dv, mt)
        tl.store(dq_ptr + tok, dq, mt)

        # Coefficient gradients (summed over layers when they share one gate set).
        ga = (ra[2], ra[3], ra[4], ma[4], ma[5], ma[6], ma[7], ma[8])
        gb = ga
        if TWO:
            gb = (rb[2], rb[3], rb[4], mb[4], mb[5], mb[6], mb[7], mb[8])
        _store_chunk_coeff_grads(db0_ptr, dc0_ptr, dct_ptr, de0_ptr, det_ptr, g, c, G, CHUNKS,
                                 ga, gb, (b0_ptr, e0_ptr, c0_ptr), PB, TWO, N,
                                 GATES)  # fmt: skip

        # Gradients at the chunk's start state; a reset sends them to M_0 (S restarts at 0).
        dwa = ma[0] + ra[0] + dwa_k + pass_wa
        dsa = ma[1] + ra[1] + pass_sa
        if TWO:
            dwb = mb[0] + rb[0] + dwb_k + pass_wb
            dsb = mb[1] + rb[1] + pass_sb
        if HAS_FLAGS:
            reset = tl.load(reset_ptr + g * CHUNKS + c) != 0
            dw0a += tl.where(reset, dwa, 0.0)
            dwa, dsa = tl.where(reset, 0.0, dwa), tl.where(reset, 0.0, dsa)
            if TWO:
                dw0b += tl.where(reset, dwb, 0.0)
                dwb, dsb = tl.where(reset, 0.0, dwb), tl.where(reset, 0.0, dsb)

    _store_state(dwa_ptr, dsa_ptr, dwb_ptr, dsb_ptr, a_idx, mask_a, b_idx, mask_b, dwa, dsa, dwb,
                 dsb, TWO)  # fmt: skip
    tl.store(dw0a_ptr + a_idx, dw0a, mask_a)
    if TWO:
        tl.store(dw0b_ptr + b_idx, dw0b, mask_b)


def scan_chunks_triton_backward(
    inputs, n_layers: int, chunk: int, residual_norm: bool, grads, tile: int | None = None
):
    """Gradients of ``memory_scan._scan_flat``'s inputs (its layout: M, S, k, v, q, the five
    coefficient fields, then optionally M_0, reset, commit) from the gradients of (reads, M', S').
    With the three gates (``kernels.span_gates``) in place of the coefficients, both launches
    compute the coefficients from them and the backward returns the gates' gradients.
    Rebuilds the chunk-start states with the forward kernel first (only the group's inputs were
    kept, as in ``_CheckpointedChunks``). ``tile``: None chooses (the forward by
    ``stream_tile``, the backward by ``backward_tile``); t > 0 runs both streamed with hidden
    tiles of t (``memory_triton_streamed_bwd``), 0 both on registers."""
    from .memory_triton import _flat_parts, scan_chunks_triton

    weights, momentum, k, v, q, coeffs, flags = _flat_parts(inputs, n_layers)
    G, T, D = k.shape
    H, chunks, dt = weights[0].shape[-1], T // chunk, k.dtype
    hist = [torch.empty(G, chunks, *w.shape[1:], dtype=dt, device=k.device) for w in weights]
    hist += [torch.empty_like(h) for h in hist]
    dims = dims_of(weights)
    fwd_tile = stream_tile(dims) if tile is None else tile
    tile = backward_tile(dims) if tile is None else tile
    scan_chunks_triton(weights, momentum, k, v, None, coeffs, chunk, residual_norm, False, flags,
                       states=hist, tile=fwd_tile)  # fmt: skip

    def prep(x):
        return x.detach().to(dt).contiguous()

    dy = prep(grads[0])
    dw = [prep(x).clone() for x in grads[1 : 1 + n_layers]]
    ds = [prep(x).clone() for x in grads[1 + n_layers :]]
    k, v, q, co = prep(k), prep(v), prep(q), [prep(x) for x in coeffs]
    dk, dv, dq = torch.empty_like(k), torch.empty_like(v), torch.empty_like(q)
    gates = len(co) == 3  # theta, log eta, log(1 - alpha): their gradients, not coefficients'
    dco = [torch.zeros_like(x) for x in co]
    co, dco = (co + co[:1] * 2, dco + dco[:1] * 2) if gates else (co, dco)  # unused slots
    dw0 = [torch.zeros_like(x) for x in dw]
    if flags is not None:
        reset, commit = (f.to(torch.int8).contiguous() for f in (flags.reset, flags.commit))
    else:
        reset = commit = k  # unused
    const = dict(PB=min(1, co[0].shape[0] - 1), D=D, H=H, N=chunk, RESNORM=residual_norm,
                 HAS_FLAGS=flags is not None, EPS=LN_EPS, BD=block_width(D),
                 GATES=gates)  # fmt: skip
    L = n_layers  # the kernels' order: M_A, S_A, M_B, S_B (layer A's again at depth 1)
    hist = [hist[0], hist[L], hist[L - 1], hist[-1]]
    outs = (dw[0], ds[0], dw[-1], ds[-1], dw0[0], dw0[-1], dk, dv, dq, *dco)
    if tile:
        from .memory_triton_streamed_bwd import _memory_scan_streamed_bwd_kernel as fn

        outs += tuple(torch.empty(G, chunk, H, dtype=dt, device=k.device) for _ in range(2))
        const.update(BT=tile, num_warps=8)
    else:
        fn = _memory_scan_bwd_kernel
        const.update(
            DEPTH=n_layers, BH=block_width(H), num_warps=num_warps(state_elements(dims) // 2)
        )
    with launch_device(k):
        fn[(G,)](*hist, k, v, q, dy, *co, reset, commit, *outs, G, chunks, T, **const)
    return _grads_out(dw, ds, dk, dv, dq, dco[:3] if gates else dco, dw0, flags)


def _grads_out(dw, ds, dk, dv, dq, dco, dw0, flags) -> list:
    out = [*dw, *ds, dk, dv, dq, *dco]
    if flags is not None:
        out += [*dw0, None, None]
    return out
