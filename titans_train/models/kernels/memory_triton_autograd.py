"""The fused memory kernels as a training path: ``TritonChunks`` (forward kernel, fused backward
kernel) and ``compile_for_cuda``, which compiles either for a GPU without one. Apart from the
kernels so that the forward module never imports the backward one (no import cycle); the kernels
are looked up on their modules at call time, so a test that reloads them under the interpreter
is followed."""

from __future__ import annotations

import torch
import triton

from ..memory_math import LN_EPS
from . import block_width, state_elements
from . import memory_triton as fwd


def compile_for_cuda(
    dims: list[int],
    chunk: int,
    capability: int = 90,
    backward: bool = False,
    tile: int = 0,
    gates: bool = True,
):
    """The forward (or backward) kernel compiled to a cubin for an NVIDIA GPU of this compute
    capability, without a GPU (Triton bundles ptxas): catches what the interpreter lets through
    (it does not check constexpr globals, types or register use). ``tile`` > 0: the streamed
    kernel with that hidden tile; ``gates``: the kernel computes the coefficients (as in
    training, ``kernels.span_gates``; the backward their gates' gradients), else loads them.
    Needs this module imported without TRITON_INTERPRET. Returns triton's CompiledKernel
    (``.asm["cubin"]``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    const = dict(D=dims[0], H=dims[1], N=chunk, DEPTH=len(dims) - 1, RESNORM=True,
                 HAS_FLAGS=True, EPS=LN_EPS)  # fmt: skip
    const.update(BD=block_width(dims[0]), BH=block_width(dims[1]), GATES=gates)
    if backward and tile:
        from .memory_triton_streamed_bwd import _memory_scan_streamed_bwd_kernel as kernel

        del const["DEPTH"], const["BH"]
        const.update(PB=0, BT=tile)
        ints = ("G", "CHUNKS", "T")
    elif backward:
        from .memory_triton_bwd import _memory_scan_bwd_kernel as kernel

        const["PB"] = 0
        ints = ("G", "CHUNKS", "T")
    elif tile:
        from .memory_triton_streamed import _memory_scan_streamed_kernel as kernel

        del const["DEPTH"], const["BH"]
        const.update(HAS_Q=True, SAVE_STATES=False, BT=tile)
        ints = ("G", "CHUNKS", "T", "PB")
    else:
        kernel = fwd._memory_scan_kernel
        const.update(HAS_Q=True, SAVE_STATES=False)
        ints = ("G", "CHUNKS", "T", "PB")
    sig = {p: "*fp32" for p in kernel.arg_names if p.endswith("_ptr")}
    sig.update(reset_ptr="*i8", commit_ptr="*i8", **{i: "i32" for i in ints})
    sig.update({c: "constexpr" for c in const})
    sig = {p: sig[p] for p in kernel.arg_names}  # the kernel's argument order
    warps = 8 if tile else fwd.num_warps(state_elements(dims) // 2)
    return triton.compile(
        ASTSource(kernel, sig, const),
        target=GPUTarget("cuda", capability, 32),
        options=dict(num_warps=warps),
    )


def _kernel_flat(inputs, n_layers: int, chunk: int, residual_norm: bool):
    """``memory_scan._scan_flat``, run by the kernel."""
    weights, momentum, k, v, q, coeffs, flags = fwd._flat_parts(inputs, n_layers)
    return fwd.scan_chunks_triton(
        weights, momentum, k, v, q, coeffs, chunk, residual_norm, False, flags
    )


class TritonChunks(torch.autograd.Function):
    """A checkpoint group of chunks on the kernels: the forward kernel, keeping only the group's
    inputs (as ``memory_scan._CheckpointedChunks`` does); the backward rebuilds the chunk-start
    states with the forward kernel and runs the fused backward kernel over the chunks in reverse
    (``memory_triton_bwd``). Same inputs and outputs as ``_CheckpointedChunks``."""

    @staticmethod
    def forward(ctx, n_layers: int, chunk: int, residual_norm: bool, compiled: bool, *inputs):
        ctx.meta = (n_layers, chunk, residual_norm)
        ctx.save_for_backward(*inputs)
        y, w, s = _kernel_flat(inputs, n_layers, chunk, residual_norm)
        return (y, *w, *s)

    @staticmethod
    def backward(ctx, *grads):
        from .memory_triton_bwd import scan_chunks_triton_backward

        n_layers, chunk, residual_norm = ctx.meta
        inputs = ctx.saved_tensors
        out = scan_chunks_triton_backward(inputs, n_layers, chunk, residual_norm, grads)
        need = ctx.needs_input_grad[4:]
        return (None, None, None, None, *(g if n else None for g, n in zip(out, need)))
