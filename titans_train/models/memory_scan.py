"""Running the memory's chunk loop over a span: activation-checkpointed groups, thread and
autocast settings, and the trailing partial chunk. The maths is in ``memory_math``."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .memory_group import group_backward, scan_group
from .memory_math import (
    DocFlags,
    apply_reset,
    chunk_coeffs,
    chunk_step,
    layer_coeffs,
    scan_chunks,
    span_coeffs,
)
from .threads import at_count, one_thread


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for this device type; nothing to disable where autocast does not exist
    (``torch.autocast("meta", enabled=False)`` raises, and the device probe runs on meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# Largest per-op tensor (G x chunk x widest memory layer, in elements) for which the chunk loop
# runs on one intra-op thread. Below it a second thread buys nothing (aten's own elementwise
# kernels stay on one thread under 32768 elements), while every op of the loop still pays an
# OpenMP fork/join, and on a loaded machine a join waits for a descheduled thread (issue 16).
SINGLE_THREAD_ELEMENTS = 32768


def loop_threads(
    k: Tensor, chunk: int, weights: list[Tensor], allowed: bool = True
) -> contextlib.AbstractContextManager:
    """One intra-op thread for a small chunk loop on CPU (if ``allowed``: ``runtime.cpu_threads``
    is auto); the caller's setting otherwise. A group's backward runs at the count its forward
    ran at (``threads.at_count``), so its recompute reduces in the forward's order."""
    small = k.shape[0] * chunk * max(w.shape[-1] for w in weights) <= SINGLE_THREAD_ELEMENTS
    return one_thread(allowed and k.device.type == "cpu" and small)


class _CheckpointedChunks(torch.autograd.Function):
    """Activation checkpointing for a group of chunks: the forward runs without autograd and keeps
    only its inputs (M and S at the group start, the group's k/v/q/gates, document flags); the
    backward recomputes the group with autograd and back-propagates through it.

    A plain Function rather than torch.utils.checkpoint: its non-reentrant mode kept more memory
    alive after the forward than no checkpointing at all (2.3 vs 1.4 GB at 4K tokens here).
    """

    @staticmethod
    def forward(ctx, n_layers: int, chunk: int, residual_norm: bool, compiled: bool, *inputs):
        ctx.meta = (n_layers, chunk, residual_norm, compiled)
        ctx.threads = torch.get_num_threads()
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            y, w, s = _scan_flat(inputs, n_layers, chunk, residual_norm, compiled)
        return (y, *w, *s)

    @staticmethod
    def backward(ctx, *grads):
        n_layers, chunk, residual_norm, compiled = ctx.meta
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        # The recompute and its backward must be the fp32 forward's: backward may run under
        # autocast (it is thread-local state), which would redo the group in bf16.
        threads = at_count(ctx.threads)
        with torch.enable_grad(), autocast_off(inputs[0].device.type), threads:
            y, w, s = _scan_flat(inputs, n_layers, chunk, residual_norm, compiled)
            outs = zip((y, *w, *s), grads)
            pairs = [(o, g) for o, g in outs if g is not None and o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, None, *(t.grad if t.requires_grad else None for t in inputs))


class _HandChunks(torch.autograd.Function):
    """A group of whole chunks on the eager path with the hand-written backward
    (``memory_group``): the forward runs without autograd; the backward walks the chunks in
    reverse in plain ops, without a graph. With ``keep`` the forward saves every chunk's start
    state; otherwise only the group's inputs (activation checkpointing) and the backward rebuilds
    the states with one more forward of the group, keeping its intermediates. Same inputs and
    outputs as ``_CheckpointedChunks``."""

    @staticmethod
    def forward(ctx, n_layers: int, chunk: int, residual_norm: bool, keep: bool, *inputs):
        weights, momentum, k, v, q, coeffs, flags = _parts(inputs, n_layers)
        keep = keep and any(ctx.needs_input_grad)  # without autograd nothing is kept
        y, w, s, states = scan_group(
            weights, momentum, k, v, q, coeffs, chunk, residual_norm, flags, keep
        )
        ctx.meta = (n_layers, chunk, residual_norm, len(inputs))
        ctx.threads = torch.get_num_threads()
        ctx.save_for_backward(*inputs, *states)
        return (y, *w, *s)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        n_layers, chunk, residual_norm, n_inputs = ctx.meta
        saved = ctx.saved_tensors
        weights, momentum, k, v, q, coeffs, flags = _parts(saved[:n_inputs], n_layers)
        states = list(saved[n_inputs:])
        # fp32 as in the forward, whatever autocast the backward runs under (thread-local state)
        with autocast_off(k.device.type), at_count(ctx.threads):
            if not states:  # rebuilt with the reads' intermediates too: each chunk's backward
                # then needs no second pass over its keys (one memory forward per chunk less)
                reads = q if grads[0] is not None else None
                states = scan_group(weights, momentum, k, v, reads, coeffs, chunk, residual_norm,
                                    flags, True)[3]  # fmt: skip
            dw, ds = list(grads[1 : 1 + n_layers]), list(grads[1 + n_layers :])
            out = group_backward(
                states, k, v, q, coeffs, chunk, residual_norm, flags, grads[0], dw, ds
            )
        if flags is not None:
            out += [None, None]  # reset, commit
        need = ctx.needs_input_grad[4:]
        return (None, None, None, None, *(g if n else None for g, n in zip(out, need)))


def _parts(inputs, n_layers: int):
    """``_scan_flat``'s input layout -> (M, S, k, v, q, coefficient fields, flags or None)."""
    weights, momentum = list(inputs[:n_layers]), list(inputs[n_layers : 2 * n_layers])
    k, v, q, *rest = inputs[2 * n_layers :]
    coeffs, extra = list(rest[:5]), rest[5:]
    flags = DocFlags(list(extra[:n_layers]), *extra[n_layers:]) if extra else None
    return weights, momentum, k, v, q, coeffs, flags


def flatten_flags(flags: DocFlags | None) -> list[Tensor]:
    return [] if flags is None else [*flags.init, flags.reset, flags.commit]


def _scan_flat(inputs, n_layers: int, chunk: int, residual_norm: bool, compiled: bool):
    """Inputs: M (L), S (L), k, v, q, the 5 coefficient fields, then optionally M_0 (L), reset
    and commit (``flatten_flags``)."""
    weights, momentum = list(inputs[:n_layers]), list(inputs[n_layers : 2 * n_layers])
    k, v, q, *rest = inputs[2 * n_layers :]
    coeffs, extra = rest[:5], rest[5:]
    flags = DocFlags(list(extra[:n_layers]), *extra[n_layers:]) if extra else None
    return scan_chunks(weights, momentum, k, v, q, coeffs, chunk, residual_norm, compiled, flags)


def _runners(triton: bool, compiled: bool, checkpoint: bool):
    """(scan without autograd, group Function, its fourth argument) of the kernel, compiled or
    eager path. The eager group keeps its chunk states (4th argument True) unless checkpointing."""
    if triton:
        from .kernels.memory_triton import scan_chunks_triton
        from .kernels.memory_triton_autograd import TritonChunks

        return scan_chunks_triton, TritonChunks, False
    if compiled:
        return scan_chunks, _CheckpointedChunks, True
    return scan_chunks, _HandChunks, not checkpoint


def memory_scan(
    weights: list[Tensor],
    momentum: list[Tensor],
    k: Tensor,
    v: Tensor,
    q: Tensor | None,
    theta: Tensor,
    log_eta: Tensor,
    log_keep: Tensor,
    chunk: int,
    residual_norm: bool,
    checkpoint_group: int = 0,
    compiled: bool = False,
    flags: DocFlags | None = None,
    triton: bool = False,
    one_thread_loops: bool = True,
) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """Run the memory over N tokens starting at a chunk boundary.

    k, v, q: [G, N, d]; gates [G, N, P]. Full chunks are committed one after the other (the
    recurrence across chunks is sequential); a trailing partial chunk is read but not committed,
    so the returned weights/momentum are those at the last chunk boundary inside the span.
    With ``checkpoint_group = g > 0`` (and autograd on) the chunks run in groups of g under
    activation checkpointing: only M and S at group boundaries are kept for backward, which is
    recomputed group by group (memory O(N/g + g) chunks instead of O(N), one more forward).
    ``compiled`` runs full chunks through torch.compile (see ``compiled_chunk_step``).
    ``flags`` restart documents at chunk boundaries (``DocFlags``; ceil(N / chunk) chunks).
    ``triton`` runs full chunks in the fused kernels (``kernels.memory_triton``, fwd and bwd).
    ``one_thread_loops``: a small loop on CPU runs on one intra-op thread (``loop_threads``).
    Returns (reads [G, N, d] or None, weights, momentum).
    """
    with loop_threads(k, chunk, weights, one_thread_loops):
        return _memory_scan(
            weights, momentum, k, v, q, theta, log_eta, log_keep, chunk, residual_norm,
            checkpoint_group, compiled, flags, triton,
        )  # fmt: skip


def _memory_scan(
    weights, momentum, k, v, q, theta, log_eta, log_keep, chunk, residual_norm,
    checkpoint_group, compiled, flags, triton=False,
):  # fmt: skip
    N = k.shape[1]
    end = N - N % chunk
    reads = []
    if end:
        train = q is not None and torch.is_grad_enabled()
        checkpoint = checkpoint_group > 0
        eager = not (triton or compiled) and q is not None  # the hand-written backward
        # The kernels train per group, the eager path always runs as groups (with autograd or
        # not), compile only to checkpoint. Without checkpointing the span is one group.
        grouped = eager or ((checkpoint or triton) and train)
        span = chunk * (checkpoint_group if checkpoint else end // chunk)
        use_kernel = triton and (train or not torch.is_grad_enabled())
        scan, group_fn, fourth = _runners(use_kernel, compiled, checkpoint)
        fold = span_coeffs
        if use_kernel:  # the kernel computes each chunk's coefficients from its gates
            from .kernels import span_gates as fold
        coeffs = fold(theta[:, :end], log_eta[:, :end], log_keep[:, :end], chunk)
        whole = None if flags is None else flags.chunks(0, end // chunk)
        if not grouped:
            kvq = [None if t is None else t[:, :end] for t in (k, v, q)]
            y, weights, momentum = scan(
                weights, momentum, *kvq, coeffs, chunk, residual_norm, compiled, whole
            )
            reads.append(y)
        else:  # torch.split: one backward (a cat) for all groups, not a zero-fill per group
            sizes = [span] * (end // span) + ([end % span] if end % span else [])
            chunks = [s // chunk for s in sizes]
            parts = [t[:, :end].split(sizes, 1) for t in (k, v, q)]
            parts += [t.split(chunks, 2) for t in coeffs]  # chunk axis
            if whole is not None:
                parts += [[whole.init] * len(sizes)]  # M_0: the same for every group
                parts += [t.split(chunks, 1) for t in (whole.reset, whole.commit)]
            n = len(weights)
            for args in zip(*parts):
                if whole is not None:
                    at = 3 + len(coeffs)  # M_0 follows k, v, q and the coefficients
                    args = (*args[:at], *args[at], *args[at + 1 :])
                out = group_fn.apply(n, chunk, residual_norm, fourth, *weights, *momentum, *args)
                reads.append(out[0])
                weights, momentum = list(out[1 : 1 + n]), list(out[1 + n :])
    if end < N and flags is not None:  # a document starting in the partial chunk restarts here
        weights, momentum = apply_reset(weights, momentum, flags, end // chunk)
    if end < N and q is not None:  # the trailing partial chunk: read, don't commit
        co = chunk_coeffs(*(g[:, end:].permute(2, 0, 1) for g in (theta, log_eta, log_keep)))
        y, _, _ = chunk_step(
            weights,
            momentum,
            k[:, end:],
            v[:, end:],
            q[:, end:],
            [layer_coeffs(co, l) for l in range(len(weights))],
            residual_norm,
            commit=False,
        )
        reads.append(y)
    out = None if q is None else torch.cat(reads, dim=1)
    return out, weights, momentum
