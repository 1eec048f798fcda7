"""The memory's chunk loop as one Triton kernel (issue 14, forward), and its training path.

``scan_chunks_triton`` computes what ``memory_math.scan_chunks`` computes, with one program per
group G (batch x head): the program walks every chunk of the span in order and keeps the group's
memory weights W_l and momentum S_l on chip for the whole span. Per chunk it runs the memory on
the chunk's keys at the chunk-start weights, back-propagates the inner loss 1/2 ||M(k) - v||^2 by
hand (LayerNorm and GELU derivatives), reads every query in the dual form (after the token's own
write), and commits W' = B W + c S - A^T diag(C theta) Delta, S' = E S - A^T diag(E theta) Delta.
Document flags reset the state to M_0 before a chunk, or discard a chunk's update.

The decay coefficients are computed in the kernel from the gates (``kernels.span_gates``,
``memory_triton_gates``), or loaded as ``span_coeffs`` gives them. The training path, this kernel
forward and the fused backward of ``memory_triton_bwd``, is ``memory_triton_autograd.TritonChunks``.

Triton decides at decoration time whether to interpret (``TRITON_INTERPRET=1`` must be set before
this module is first imported to run on CPU tensors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..memory_math import LN_EPS, DocFlags
from . import (
    block_width,
    kernel_shape_problem,
    launch_device,
    state_elements,
    stream_tile,
    triton_device_problem,
)
from .memory_triton_ops import (
    _chunk_coeffs,
    _chunk_state_at,
    _commit,
    _dual_read,
    _gelu,
    _keys_errors,
    _layer_norm,
    _load_state,
    _store_state,
    _tile_ptrs,
    _token_ptrs,
)


@triton.jit
def _memory_scan_kernel(
    wa_ptr, sa_ptr, wb_ptr, sb_ptr,  # state in/out: layer A [G, D, H], layer B [G, H, D]
    w0a_ptr, w0b_ptr,  # M_0 per group (document resets)
    k_ptr, v_ptr, q_ptr, y_ptr,  # [G, T, D]
    b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr,  # [P, G, chunks, N(, N)]
    reset_ptr, commit_ptr,  # int8 [G, chunks]
    hwa_ptr, hsa_ptr, hwb_ptr, hsb_ptr,  # SAVE_STATES: W, S at every chunk start [G, chunks, ..]
    G, CHUNKS, T, PB,  # PB: gate set of layer B (0 if shared, 1 if per layer)
    D: tl.constexpr, H: tl.constexpr, N: tl.constexpr, DEPTH: tl.constexpr,
    RESNORM: tl.constexpr, HAS_Q: tl.constexpr, HAS_FLAGS: tl.constexpr, EPS: tl.constexpr,
    BD: tl.constexpr, BH: tl.constexpr, SAVE_STATES: tl.constexpr = False,
    GATES: tl.constexpr = False,  # the coefficient pointers hold theta, log eta, log(1 - alpha)
):  # fmt: skip
    """One program per group. DEPTH 1: layer A alone is [D, D] (H == D, layer B unused).
    SAVE_STATES keeps every chunk's start state (after a reset) for the fused backward. GATES
    computes each chunk's coefficients from its gates in the kernel (``_gate_coeffs``).
    Widths D, H are held in blocks BD, BH (powers of two): the padding loads as zeros and stays
    zero (GELU(0) = 0, zero rows/columns get zero updates); LayerNorm reduces over D."""
    g = tl.program_id(0).to(tl.int64)
    PAD: tl.constexpr = BD != D
    TWO: tl.constexpr = DEPTH == 2
    md = tl.arange(0, BD) < D
    a_idx, mask_a, b_idx, mask_b = _tile_ptrs(g, 0, D, H, BD, BH)
    wa, sa, wb, sb = _load_state(wa_ptr, sa_ptr, wb_ptr, sb_ptr, a_idx, mask_a, b_idx, mask_b, TWO)
    if HAS_FLAGS:
        w0a = tl.load(w0a_ptr + a_idx, mask_a, other=0.0)
        if TWO:
            w0b = tl.load(w0b_ptr + b_idx, mask_b, other=0.0)

    for c in range(CHUNKS):
        tok, mt = _token_ptrs(g, c, T, D, N, BD)
        kc, vc = tl.load(k_ptr + tok, mt, other=0.0), tl.load(v_ptr + tok, mt, other=0.0)
        if HAS_FLAGS:
            reset = tl.load(reset_ptr + g * CHUNKS + c) != 0
            wa, sa = tl.where(reset, w0a, wa), tl.where(reset, 0.0, sa)
            if TWO:
                wb, sb = tl.where(reset, w0b, wb), tl.where(reset, 0.0, sb)
        if SAVE_STATES:
            h_at = _chunk_state_at(g, c, CHUNKS, D, H)
            _store_state(hwa_ptr + h_at, hsa_ptr + h_at, hwb_ptr + h_at, hsb_ptr + h_at, a_idx,
                         mask_a, b_idx, mask_b, wa, sa, wb, sb, TWO)  # fmt: skip

        # The memory on the chunk's keys at the chunk-start weights, and its errors delta_l.
        _, a1, _, d1, d_out, _, _, _ = _keys_errors(kc, vc, wa, wb, D, EPS, md, PAD, RESNORM, DEPTH)
        ca = _chunk_coeffs(b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr, g * CHUNKS + c, N, GATES)
        if TWO:
            cb = _chunk_coeffs(
                b0_ptr, e0_ptr, c0_ptr, ct_ptr, et_ptr, (PB * G + g) * CHUNKS + c, N, GATES
            )

        if HAS_Q:
            qc = tl.load(q_ptr + tok, mt, other=0.0)
            if TWO:
                hq = _gelu(_dual_read(qc, wa, sa, kc, d1, ca[0], ca[1], ca[2]))
                zq = _dual_read(hq, wb, sb, a1, d_out, cb[0], cb[1], cb[2])
            else:
                zq = _dual_read(qc, wa, sa, kc, d_out, ca[0], ca[1], ca[2])
            if RESNORM:
                zq = qc + _layer_norm(zq, D, EPS, md, PAD)[0]
            tl.store(y_ptr + tok, zq, mt)

        wa_n, sa_n = _commit(wa, sa, kc, d1, ca[3], ca[4], ca[5], ca[6], ca[7])
        if TWO:
            wb_n, sb_n = _commit(wb, sb, a1, d_out, cb[3], cb[4], cb[5], cb[6], cb[7])
        if HAS_FLAGS:
            keep = tl.load(commit_ptr + g * CHUNKS + c) != 0
            wa, sa = tl.where(keep, wa_n, wa), tl.where(keep, sa_n, sa)
            if TWO:
                wb, sb = tl.where(keep, wb_n, wb), tl.where(keep, sb_n, sb)
        else:
            wa, sa = wa_n, sa_n
            if TWO:
                wb, sb = wb_n, sb_n

    _store_state(wa_ptr, sa_ptr, wb_ptr, sb_ptr, a_idx, mask_a, b_idx, mask_b, wa, sa, wb, sb, TWO)


def check_kernel_inputs(weights: list[Tensor], k: Tensor, chunk: int) -> None:
    """A one-line error naming the setting when the kernel cannot take these inputs."""
    dims = dims_of(weights)
    problem = kernel_shape_problem(dims, chunk) or triton_device_problem(k.device)
    if problem is None and k.dtype not in (torch.float32, torch.float64):
        problem = f"dtype {k.dtype} (the memory state is float32 or float64)"
    if problem:
        raise ValueError(f"runtime.memory_backend='triton' cannot run this memory: {problem}")


def scan_chunks_triton(
    weights: list[Tensor],
    momentum: list[Tensor],
    k: Tensor,
    v: Tensor,
    q: Tensor | None,
    coeffs: list[Tensor],
    chunk: int,
    residual_norm: bool,
    compiled: bool = False,
    flags: DocFlags | None = None,
    states: list[Tensor] | None = None,
    tile: int | None = None,
) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """``memory_math.scan_chunks`` (same arguments; ``compiled`` is ignored) as one kernel launch.
    No autograd: ``TritonChunks`` gives the gradients. ``coeffs``: ``span_coeffs``' five
    tensors, or the three gates folded by ``kernels.span_gates`` ([P, G, chunks, N]), from
    which the kernel computes each chunk's coefficients itself. ``states`` (M then S per layer, each
    [G, chunks, d_in, d_out], contiguous): filled with every chunk's start state. ``tile``: 0 runs
    the register kernel, t > 0 the streamed one with hidden tiles of t (depth 2), None chooses
    (``kernels.stream_tile``)."""
    check_kernel_inputs(weights, k, chunk)
    G, T, D = k.shape
    H, dt = weights[0].shape[-1], k.dtype

    def prep(x: Tensor) -> Tensor:
        return x.detach().to(dt).contiguous()

    w = [prep(x).clone() for x in weights]
    s = [prep(x).clone() for x in momentum]
    k, v, co = prep(k), prep(v), [prep(x) for x in coeffs]
    gates = len(co) == 3  # theta, log eta, log(1 - alpha): coefficients computed in the kernel
    co += co[:1] * 2 if gates else []  # unused
    q = None if q is None else prep(q)
    y = torch.empty_like(k) if q is not None else k
    if flags is not None:
        w0 = [prep(x) for x in flags.init]
        reset, commit = (f.to(torch.int8).contiguous() for f in (flags.reset, flags.commit))
    else:
        w0, reset, commit = w, k, k  # unused (HAS_FLAGS is off)
    wb, sb, w0b = (w[-1], s[-1], w0[-1]) if len(w) == 2 else (w[0], s[0], w0[0])
    L = len(w)  # the kernel's order: M_A, S_A, M_B, S_B
    hist = [k] * 4 if states is None else [states[0], states[L], states[L - 1], states[-1]]
    tile = stream_tile(dims_of(w)) if tile is None else tile
    if tile and len(w) != 2:
        raise ValueError(f"the streamed kernel has memory depth 2, not {len(w)}")
    args = (w[0], s[0], wb, sb, w0[0], w0b, k, v, k if q is None else q, y, *co, reset, commit,
            *hist, G, T // chunk, T, min(1, co[0].shape[0] - 1))  # fmt: skip
    const = dict(D=D, H=H, N=chunk, RESNORM=residual_norm, HAS_Q=q is not None,
                 HAS_FLAGS=flags is not None, EPS=LN_EPS, BD=block_width(D),
                 SAVE_STATES=states is not None, GATES=gates)  # fmt: skip
    if tile:
        from .memory_triton_streamed import _memory_scan_streamed_kernel as fn

        const.update(BT=tile, num_warps=8)
    else:
        fn = _memory_scan_kernel  # looked up per call: tests count its launches
        const.update(
            DEPTH=L, BH=block_width(H), num_warps=num_warps(state_elements(dims_of(w)) // 2)
        )
    with launch_device(k):
        fn[(G,)](*args, **const)
    return (y if q is not None else None), w, s


def dims_of(weights: list[Tensor]) -> list[int]:
    """Layer widths (d, hidden..., d) of the memory weights [G, d_in, d_out]."""
    return [weights[0].shape[-2]] + [w.shape[-1] for w in weights]


def num_warps(weight_elements: int) -> int:
    """Warps per program (``weight_elements``: W of all layers at the padded widths): 8 once
    W + S exceed 2 x 1024 values. Compiled for sm80/sm90 by ptxas (``compile_for_cuda``),
    d 16 / hidden 64 at 4 warps spills 128 bytes a thread, at 8 none."""
    return 4 if weight_elements <= 1024 else 8


def _flat_parts(inputs, n_layers: int):
    """``memory_scan._scan_flat``'s input layout -> (M, S, k, v, q, coeffs, flags)."""
    weights, momentum = list(inputs[:n_layers]), list(inputs[n_layers : 2 * n_layers])
    k, v, q, *rest = inputs[2 * n_layers :]
    n_co = 5 if len(rest) > 3 and rest[3].dim() == 5 else 3  # coefficients (C theta: 5-D) or gates
    coeffs, extra = rest[:n_co], rest[n_co:]
    flags = DocFlags(list(extra[:n_layers]), *extra[n_layers:]) if extra else None
    return weights, momentum, k, v, q, coeffs, flags
